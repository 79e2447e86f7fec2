"""The package version (saved in every cfg.json and sweep.json)."""

__version__ = "0.1.0"
