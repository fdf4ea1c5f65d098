"""Benchmarks of the ways to run one small task (``make bench``; see bench/README.md).

Not tests: nothing here asserts on time. The code is checked by ruff like the rest.
"""
