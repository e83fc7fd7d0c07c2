"""snapfs: the snapshot service as a filesystem."""

from importlib import metadata

try:
    __version__ = metadata.version("snapfs")
except metadata.PackageNotFoundError:  # run from a source tree that is not installed
    __version__ = "0.0.0+unknown"
