"""The older path of :mod:`hpcgraft.cli.checkpoint`: ``python -m hpcgraft.checkpoint`` and its imports still work."""
from hpcgraft.cli import forward

forward(__name__, "hpcgraft.cli.checkpoint")
