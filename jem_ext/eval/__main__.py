"""``python -m jem_ext.eval``: evaluate a JEM checkpoint; see :mod:`jem_ext.eval.report`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
