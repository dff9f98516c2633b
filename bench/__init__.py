"""Benchmarks that drive the real runtime against a real Redis (see ``python -m bench.cycles --help``)."""
