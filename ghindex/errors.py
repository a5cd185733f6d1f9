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


class OutputError(GhindexError):
    """An output cannot be written: no space left on the device (or quota), a read-only file system,
    no permission, or an I/O error. Raised where the output is written (`ghindex.io.writing`).

    `path`: the output; `reason`: what went wrong, in words (`ghindex.io.OUTPUT_REASONS`); `hint`: what
    was kept and how to go on, added by the command that knows (`set_hint`). The message is
    `PATH: reason` plus `; hint` when there is one.
    """

    def __init__(self, path, reason: str, hint: str = ""):
        super().__init__(path, reason, hint)
        self.path = str(path)
        self.reason = reason
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}" + (f"; {self.hint}" if self.hint else "")

    @property
    def remedy(self) -> str:
        """What the user has to do before going on: 'free space', 'make ... writable', 'check the disk'."""
        if self.reason == "no space left on device":
            return "free space"
        if self.reason == "I/O error":
            return "check the disk"
        return f"make {_folder_of(self.path)} writable"

    def set_hint(self, hint: str, replace: bool = True) -> "OutputError":
        """Say what was kept and how to go on: the command that knows most replaces a writer's generic
        hint (`replace=False`: only where there is none yet)."""
        if hint and (replace or not self.hint):
            self.hint = hint
        return self


def _folder_of(path: str) -> str:
    import os

    return os.path.dirname(os.path.abspath(path)) or path
