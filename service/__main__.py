"""``python -m service``: the same as ``detector-serve``."""

import sys

from .cli import main

sys.exit(main())
