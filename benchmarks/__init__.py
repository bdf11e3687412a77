"""Benchmarks and the analysis code they share (run each as ``python -m benchmarks.NAME``)."""
