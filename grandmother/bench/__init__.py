"""Benchmarks: kernels against the machine and peers, the data path, the engines."""
