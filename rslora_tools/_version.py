"""The package version (one place: pyproject.toml reads it, every module imports it from here, not from the package
face)."""

__version__ = "0.2.0"
