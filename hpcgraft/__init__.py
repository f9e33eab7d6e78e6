"""hpcgraft: filter grafting of neural networks on HPC clusters.

Layers, each importing only those below it: ``errors``; ``config`` and ``models``; ``method`` (the math)
and ``storage`` (files); ``dist`` (between ranks) and ``data``; ``training``; and the commands (``train``,
``launch``, ``graft``, ``analyze``, ``report``, ``checkpoint``). Importing any of them starts no MPI.
"""
