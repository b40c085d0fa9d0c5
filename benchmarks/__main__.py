"""``python -m benchmarks``: run every benchmark and write docs/BENCHMARKS.md (see benchmarks.run_all)."""

import sys

from .run_all import main

sys.exit(main())
