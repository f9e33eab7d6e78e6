"""The older path of :mod:`hpcgraft.cli.prune`: ``python -m hpcgraft.prune`` and its imports still work."""
from hpcgraft.cli import forward

forward(__name__, "hpcgraft.cli.prune")
