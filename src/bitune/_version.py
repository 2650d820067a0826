"""The package version (read by pyproject.toml and written into checkpoints and reports)."""

__version__ = "0.1.0"
