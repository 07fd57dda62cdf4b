"""``python -m jem_ext.score``: score images or arrays with a trained JEM (see :mod:`.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
