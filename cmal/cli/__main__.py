"""``python -m cmal.cli``: what the ``cmal`` console script runs."""

import sys

from cmal.cli import main

if __name__ == "__main__":
    sys.exit(main())
