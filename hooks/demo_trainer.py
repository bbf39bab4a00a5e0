"""`python hooks/demo_trainer.py ...` from a checkout: the same as `python -m molgen_export.integrations.demo_trainer ...`."""

import sys

from molgen_export.integrations.demo_trainer import *  # noqa: F403 - this script is the module under its card name
from molgen_export.integrations.demo_trainer import main

if __name__ == "__main__":
    sys.exit(main())
