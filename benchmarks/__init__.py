"""Benchmarks: one harness (harness.py) and one script per op/level; results/ holds JSON from real runs."""
