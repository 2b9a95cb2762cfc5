"""Choosing rows: the α/β thresholds, k-center greedy and its backends, the coverage methods,
token budgets, source cut-offs, and coverage curves."""
