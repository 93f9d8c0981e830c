"""The package version, in a module of its own so that caches and manifests can record it without importing the
trainer."""

__version__ = "0.1.0"
