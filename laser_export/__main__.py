"""``python -m laser_export ...``: the same command line as ``laser-export``."""

import sys

from .cli import main

sys.exit(main())
