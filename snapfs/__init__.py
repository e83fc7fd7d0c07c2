"""snapfs: the snapshot service as a filesystem."""

from __future__ import annotations


def __getattr__(name: str) -> str:
    # __version__ is looked up when asked for, not at import: importlib.metadata
    # takes a while to load, and a Ctrl-C then would come before the CLI can
    # catch it (every `python -m snapfs` imports this package first).
    if name != "__version__":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import metadata
    try:
        version = metadata.version("snapfs")
    except metadata.PackageNotFoundError:  # run from a source tree that is not installed
        version = "0.0.0+unknown"
    globals()["__version__"] = version
    return version
