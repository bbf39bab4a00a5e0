"""`hooks/titan_checkpoint.py` from a checkout: the same as `molgen_export.integrations.titan_checkpoint`."""

from molgen_export.integrations.titan_checkpoint import *  # noqa: F403 - this script is the module under its card name
