"""Direct Preference Optimization and its relatives, from scratch in PyTorch."""

__version__ = "0.1.0"
