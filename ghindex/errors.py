"""Typed exceptions. Every message is one line a user can act on; the CLI prints it as `Error: ...`."""


class GhindexError(Exception):
    """Base class for problems caused by input, files or configuration (not bugs)."""


class ConfigError(GhindexError, ValueError):
    """An argument or configuration value is invalid (bits, backbone name, k, radius...)."""


class WeightsError(GhindexError):
    """A backbone weights file cannot be used (unreadable, wrong keys or shapes)."""


class ModelFileError(GhindexError):
    """A model file is missing, truncated, foreign or unsafe."""


class DataError(GhindexError):
    """A data source (folder, list file, array file, protocol) is invalid."""


class ImageError(DataError):
    """One image cannot be decoded or is unsafe to decode."""


class StoreError(GhindexError):
    """An HDF5 code store is missing, incomplete, foreign or mismatched."""


class IndexFileError(GhindexError):
    """A FAISS index file is missing, foreign or inconsistent with its metadata."""


class SearchError(GhindexError, ValueError):
    """A search request is invalid (code width, k, radius, GPU limits)."""
