"""s4lib: structured state-space sequence layers (S4, S4D) for PyTorch."""

__version__ = "0.1.0"
