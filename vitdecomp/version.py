"""The package version (recorded in manifests and reports)."""
__version__ = "0.1.0"
