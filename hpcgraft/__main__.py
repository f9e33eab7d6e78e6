"""``python -m hpcgraft <command> ...``: the same as the ``hpcgraft`` command."""

import sys

if __name__ == "__main__":
    from hpcgraft.cli import main

    sys.exit(main())
