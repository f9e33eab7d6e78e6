"""The older path of :mod:`hpcgraft.cli.report`: ``python -m hpcgraft.report`` and its imports still work."""
from hpcgraft.cli import forward

forward(__name__, "hpcgraft.cli.report")
