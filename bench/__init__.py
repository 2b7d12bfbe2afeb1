"""Benchmarks: the compiled kernels (test_kernels.py) and the filesystem harness."""
