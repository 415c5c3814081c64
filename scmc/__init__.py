"""scmc: an ahead-of-time compiler from YAML layer templates to standalone PyTorch packages."""

__version__ = "0.1.0"
