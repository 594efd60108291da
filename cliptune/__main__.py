"""``python -m cliptune``: the same as the ``cliptune`` command."""

import sys

from cliptune.cli import main

if __name__ == "__main__":
    sys.exit(main())
