"""`python -m molgen_export ...`: the command line (see molgen_export.cli)."""

import sys

from molgen_export.cli import main

if __name__ == "__main__":
    sys.exit(main())
