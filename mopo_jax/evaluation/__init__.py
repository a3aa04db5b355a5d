"""Evaluation: preference models (labelers and judges), generation-based win rates, KL, Pareto fronts."""
