"""``python -m gateway``: the same command as ``chatterbox-gateway``."""

import sys

from gateway.cli import main

if __name__ == "__main__":
    sys.exit(main())
