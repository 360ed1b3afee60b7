"""Benchmarks: side-by-side runs, medians over repeats, results under bench/results/."""
