"""Benchmarks of lragent_jax, one module each, run as `python -m bench.<name>` (docs/benchmarks.md)."""
