"""`python -m flashdiff ...`: the command line (flashdiff.cli)."""
import sys

from flashdiff.cli import main

# Guarded: worker processes started with "spawn" (flashdiff tune's parallel precompile) re-run
# this module as __mp_main__, and must not start the command line again.
if __name__ == "__main__":
    sys.exit(main())
