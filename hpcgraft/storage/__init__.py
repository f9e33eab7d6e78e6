"""What a run keeps on disk: one atomic writer, the HDF5 tree, checkpoints (manifest, verification and
the manager of cadence and keep/best), the run's logs, and loading a model's state from any saved file.

No MPI at import; the checkpoint manager takes the communicator it is given, and offline readers none.
"""
