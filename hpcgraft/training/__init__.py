"""Training: the one layer that sees everything. A peer's state, the loop that trains, grafts, evaluates
and saves it, and the run directory around it; :mod:`hpcgraft.train` is its command line."""
