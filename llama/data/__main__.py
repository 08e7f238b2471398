"""`python -m llama.data prepare ...`: the command line of llama/data/cli.py."""

import sys

from llama.data.cli import main

if __name__ == "__main__":
    sys.exit(main())
