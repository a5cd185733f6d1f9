"""The `ghindex` command line (installed as the `ghindex_cli` package): thin wrappers over ghindex."""
from .main import cli

__all__ = ["cli"]
