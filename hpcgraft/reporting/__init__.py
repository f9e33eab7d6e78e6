"""What the report command reads and writes, below the command so that other commands (sweep) and tools
share it: the runs as read from their directories (:mod:`.runs`), the Markdown tables (:mod:`.tables`), the
PNG plots (:mod:`.plots`, the one module that needs matplotlib, ``pip install 'hpcgraft[report]'``) and the
report they make together (:mod:`.summary`); and the analyze command's tables of invalid filters
(:mod:`.filters`)."""
