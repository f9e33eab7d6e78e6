"""The older path of :mod:`hpcgraft.cli.evaluate`: ``python -m hpcgraft.evaluate`` and its imports still work."""
from hpcgraft.cli import forward

forward(__name__, "hpcgraft.cli.evaluate")
