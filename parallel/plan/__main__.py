"""`python -m parallel.plan`: the command line of parallel/plan/cli.py."""

import sys

from .cli import main

sys.exit(main())
