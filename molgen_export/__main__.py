"""`python -m molgen_export ...`: the command line (see molgen_export.cli)."""

from molgen_export.cli import run

if __name__ == "__main__":
    run()
