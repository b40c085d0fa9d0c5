"""Benchmarks of the detector: detection overhead, κ along a path, PGD throughput, service load.

Run them all and write ``docs/BENCHMARKS.md`` with one command::

    python -m benchmarks            # full run (about 20 minutes on 2 CPU cores)
    python -m benchmarks --quick    # smoke mode (about a minute)

Every module exposes ``run(...) -> Section``; :mod:`benchmarks.run_all` renders the sections.
"""
