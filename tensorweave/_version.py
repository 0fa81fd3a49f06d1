"""The installed distribution's version, in a module of its own so that code deep in the package (state files
record it) can read it without importing the public API in ``tensorweave/__init__``, which imports that code."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tensorweave")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
