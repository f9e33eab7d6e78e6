"""The method itself: grafting math, cultivation loss, learning-rate schedules, seeding and kernel pruning criteria.

Pure torch on tensors and state dicts: no MPI, no files. Everything here can be called offline, and the
distributed layers only move its inputs and outputs between ranks.
"""
