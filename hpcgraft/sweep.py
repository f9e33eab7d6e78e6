"""The older path of :mod:`hpcgraft.cli.sweep`: ``python -m hpcgraft.sweep`` and its imports still work."""
from hpcgraft.cli import forward

forward(__name__, "hpcgraft.cli.sweep")
