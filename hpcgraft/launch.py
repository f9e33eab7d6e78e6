"""The older path of :mod:`hpcgraft.cli.submit`: ``python -m hpcgraft.launch`` and ``hpcgraft.launch.submit``
keep working."""
from hpcgraft.cli import forward

forward(__name__, "hpcgraft.cli.submit")
