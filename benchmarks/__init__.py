"""Benchmarks (run on the GPU machine; never part of the test suite)."""
