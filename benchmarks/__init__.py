"""Benchmarks of SS-BSN (``pytest benchmarks/``). See benchmarks/README.md."""
