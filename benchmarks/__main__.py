"""``python -m benchmarks``: run every benchmark and write docs/BENCHMARKS.md (see benchmarks.run_all)."""

import signal
import sys

from .run_all import main

# A time limit's SIGTERM (benchmarks/gpu_run.py) ends the run through the normal exit path, so that the
# servers and workers it started are stopped by their `finally` blocks instead of outliving it.
signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

sys.exit(main())
