"""The older path of :mod:`hpcgraft.cli.analyze`: ``python -m hpcgraft.analyze`` and its imports still work."""
from hpcgraft.cli import forward

forward(__name__, "hpcgraft.cli.analyze")
