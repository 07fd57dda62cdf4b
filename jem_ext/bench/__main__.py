"""Entry point of ``python -m jem_ext.bench``."""

import sys

from .cli import main

sys.exit(main())
