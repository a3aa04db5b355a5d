"""Synthetic tabular preference problems and exact NumPy/SciPy reference solutions."""
