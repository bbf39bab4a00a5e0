"""`python hooks/on_export_smoke.py ...` from a checkout: the same as `python -m molgen_export.integrations.on_export_smoke ...`."""

import sys

from molgen_export.integrations.on_export_smoke import *  # noqa: F403 - this script is the module under its card name
from molgen_export.integrations.on_export_smoke import main

if __name__ == "__main__":
    sys.exit(main())
