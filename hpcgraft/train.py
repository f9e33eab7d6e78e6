"""The older path of :mod:`hpcgraft.cli.train`: ``python -m hpcgraft.train`` and its imports still work."""
from hpcgraft.cli import forward

forward(__name__, "hpcgraft.cli.train")
