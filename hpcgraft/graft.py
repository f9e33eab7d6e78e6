"""The older path of :mod:`hpcgraft.cli.graft`: ``python -m hpcgraft.graft`` and its imports still work."""
from hpcgraft.cli import forward

forward(__name__, "hpcgraft.cli.graft")
