"""Files a data row names, kept inside the row's data folder.

A row's relative media path (a screenshot, a video, a frame) is joined to its data folder and
resolved with every symlink followed (``Path.resolve(strict=True)``); the result must lie inside
the folder, itself resolved. A textual check is not enough: ``shots/a.png`` may be a symlink to
``/etc/hostname``, and ``a/../../x`` leaves the folder without starting with ``..``. Whether an
absolute path is accepted at all is the loader's choice (each loader's docstring says); this
module only judges relative ones.
"""

from __future__ import annotations

import os
from pathlib import Path

from mmpo.errors import DataError


class PathRefused(DataError):
    """A row's path that is missing or resolves outside its data folder. ``why`` is the message
    without the location prefix (for loaders that record skipped rows by key)."""

    def __init__(self, where: str, why: str) -> None:
        super().__init__(f"{where}: {why}" if where else why)
        self.why = why


def contained_path(base: str | os.PathLike[str], ref: str | os.PathLike[str], where: str = "") -> Path:
    """The resolved file of relative path ``ref`` under folder ``base`` (symlinks followed).

    Raises :class:`PathRefused` (a ``DataError``; message prefixed with ``where``, e.g.
    ``"<file>: line 3: key 'video'"``) when ``ref`` is absolute, the file does not exist (or is a
    symlink loop), or its resolved target lies outside ``base``; the message names ``ref`` and the
    resolved target.
    """
    ref_path = Path(ref)
    if ref_path.is_absolute():
        raise PathRefused(where, f"{os.fspath(ref)!r} is an absolute path; give a path relative to {base}")
    root = Path(base).resolve()
    joined = Path(base) / ref_path
    try:
        target = joined.resolve(strict=True)
    except FileNotFoundError:
        raise PathRefused(where, f"file not found: {joined}") from None
    except (OSError, RuntimeError) as e:  # a symlink loop (RuntimeError before Python 3.13), a bad name
        raise PathRefused(where, f"{joined}: cannot be resolved ({e})") from None
    if not target.is_relative_to(root):
        raise PathRefused(
            where, f"{os.fspath(ref)!r} resolves outside the data folder {root}, to {target} (symlinks are followed)"
        )
    return target


__all__ = ["PathRefused", "contained_path"]
