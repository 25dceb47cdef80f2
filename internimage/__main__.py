"""``python -m internimage``: the same as the ``internimage`` command."""

import sys

from internimage.cli import main

if __name__ == "__main__":
    sys.exit(main())
