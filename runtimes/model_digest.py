"""The digest of a model folder: what the manager records at upload and a runtime checks before loading.

A folder's *manifest* maps every file's path relative to the folder (POSIX separators) to the sha256 of its bytes.
Its *digest* is the sha256 of the manifest serialized as ``path NUL hex LF`` lines in sorted path order, so it
depends on file names and contents only (not on timestamps, modes or the archive format). Directories are not
entries: an empty folder changes nothing. A link or other non-regular file is an entry whose hash can never match
a file's, since uploads refuse links. ``__pycache__`` folders are left out: Python writes them next to the
modules it imports (the manager's signature check does), and a verified runtime removes them before it imports
anything from the folder and writes none (runtimes/server.py), so they cannot change what is loaded.

Shared by manager_api (at upload) and the runtime (``--expect-digest``); it imports nothing of either.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

_CHUNK = 1024 * 1024
#: The manifest value of an entry that is not a regular file (a link, a fifo...).
NOT_A_FILE = "not-a-regular-file"
#: Bytecode caches: written by Python next to imported modules, never part of a model (see the module docstring).
PYCACHE = "__pycache__"


class FolderMismatch(ValueError):
    """The folder is not the one registered; the message names the first differing, missing or extra file."""


def _file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as source:
        while chunk := source.read(_CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def folder_manifest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (recursively, links not followed) -> the sha256 hex of its contents."""
    manifest: dict[str, str] = {}
    for directory, subdirs, files in os.walk(folder, followlinks=False):
        base = Path(directory)
        subdirs[:] = [d for d in subdirs if d != PYCACHE]
        # os.walk lists a link to a directory among subdirs and does not enter it: it is an entry too.
        for name in [*files, *(d for d in subdirs if (base / d).is_symlink())]:
            path = base / name
            relative = path.relative_to(folder).as_posix()
            is_file = path.is_file() and not path.is_symlink()
            manifest[relative] = _file_sha256(path) if is_file else NOT_A_FILE
    return dict(sorted(manifest.items()))


def manifest_digest(manifest: Mapping[str, str]) -> str:
    """``sha256:<hex>`` of a manifest, independent of the mapping's order."""
    sha = hashlib.sha256()
    for path in sorted(manifest):
        sha.update(path.encode() + b"\0" + manifest[path].encode() + b"\n")
    return f"sha256:{sha.hexdigest()}"


def folder_digest(folder: Path) -> str:
    """``sha256:<hex>`` of the folder's manifest."""
    return manifest_digest(folder_manifest(folder))


def first_difference(expected: Mapping[str, str], actual: Mapping[str, str]) -> str | None:
    """The first path (in sorted order) where two manifests differ, said in words; None if they are equal."""
    for path in sorted(set(expected) | set(actual)):
        want, have = expected.get(path), actual.get(path)
        if want == have:
            continue
        if have is None:
            return f"{path} is missing"
        if want is None:
            return f"{path} is not part of the registered model (extra file)"
        if have == NOT_A_FILE:
            return f"{path} is not a regular file"
        return f"{path} differs (sha256 {have[:12]}..., registered {want[:12]}...)"
    return None


def verify_folder(folder: Path, expected_digest: str, expected_manifest: Mapping[str, str] | None = None) -> None:
    """Raise FolderMismatch unless ``folder`` has ``expected_digest``.

    With the registered manifest (which must itself have ``expected_digest``) the message names the first file
    that differs; without it, only the two digests can be given.
    """
    actual = folder_manifest(folder)
    digest = manifest_digest(actual)
    if digest == expected_digest:
        return
    prefix = f"model folder {folder} does not match its registered digest {expected_digest}"
    if expected_manifest is not None and manifest_digest(expected_manifest) == expected_digest:
        reason = first_difference(expected_manifest, actual)
        raise FolderMismatch(f"{prefix}: {reason}")
    raise FolderMismatch(f"{prefix}: its digest is {digest}")
