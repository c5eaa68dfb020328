"""Evaluation: metrics, the quality rows of `bpd-sr evaluate`, the paper's table and speed
benchmarks, and pictures."""
