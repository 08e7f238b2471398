"""`python -m parallel.plan`: the command line of parallel/plan/cli.py."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
