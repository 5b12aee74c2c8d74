"""Benchmarks (``tools/bench_*.py``): one module each, sharing ``harness``. Sits above training."""
