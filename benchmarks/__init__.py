"""Benchmarks: commands that print figures (medians, and ratios against a baseline timed in the
same run).  ``python -m benchmarks.<name>``; ``make bench`` runs them all."""
