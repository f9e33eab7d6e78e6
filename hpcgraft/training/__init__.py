"""Training: the one layer that sees everything. A peer's state, the loop that trains, evaluates, grafts
and saves it (the reference's order: an epoch is evaluated before its graft), and the run directory
around it; :mod:`hpcgraft.train` is its command line."""
