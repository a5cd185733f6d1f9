"""The installed package's version (a leaf module: anything may import it, the package `__init__` included)."""
from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("ghindex")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0+unknown"
