"""Unpacking uploaded model archives (.tar, .tar.gz or .zip) without trusting their contents.

An archive may try to write outside the target folder (absolute paths, ``..``, links) or to explode
(a few KB that unpack to GBs). Both are refused with ArchiveError naming the member at fault.
"""

from __future__ import annotations

import lzma
import shutil
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from runtimes.model_digest import folder_manifest
from runtimes.serving_config import SERVING_FILE

#: Default ceiling on the unpacked size of one model folder.
MAX_UNPACKED_BYTES = 8 * 1024**3


class ArchiveError(ValueError):
    """The upload is not a usable model archive; the message says why."""


#: What reading a cut-short or corrupt archive raises: the decompressors' own errors are not all OSErrors.
_DAMAGED = (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, zlib.error, lzma.LZMAError)


def _checked_member_path(name: str) -> PurePosixPath:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        # tarfile keeps undecodable bytes as surrogates: such a name cannot go into the manifest (JSON, UTF-8).
        shown = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        raise ArchiveError(f"archive member {shown!r} has a name that is not UTF-8") from None
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in name):
        # A newline or tab in a file name breaks every listing and log line that shows it.
        raise ArchiveError(f"archive member {name!r} has a control character in its name")
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        raise ArchiveError(f"archive member {name!r} points outside the model folder")
    return path


def unpack_archive(archive: Path, target: Path, max_bytes: int = MAX_UNPACKED_BYTES) -> Path:
    """Unpack into ``target`` and return the model folder: the root, or the single top folder holding serving.yaml."""
    target.mkdir(parents=True, exist_ok=True)
    if _is_tar(archive):
        _unpack_tar(archive, target, max_bytes)
    elif zipfile.is_zipfile(archive):
        _unpack_zip(archive, target, max_bytes)
    else:
        raise ArchiveError("the upload is not a .tar, .tar.gz or .zip archive")
    return model_root(target)


def _is_tar(archive: Path) -> bool:
    """Whether ``archive`` is a (possibly compressed) tar; a damaged one is an ArchiveError saying so."""
    try:
        return tarfile.is_tarfile(archive)
    except _DAMAGED as exc:
        # is_tarfile reads the first member: a .tar.gz cut short raises EOFError from gzip instead of answering.
        raise ArchiveError(f"the archive is damaged: {exc}") from exc


def archive_manifest(archive: Path, scratch: Path, max_bytes: int = MAX_UNPACKED_BYTES) -> dict[str, str]:
    """The manifest (path -> sha256, runtimes/model_digest.py) of the model folder ``archive`` unpacks to.

    Unpacked afresh in ``scratch``: what a deployer unpacks from the same bytes, untouched by any check that ran
    the model (and wrote bytecode next to it).
    """
    return folder_manifest(unpack_archive(archive, scratch, max_bytes))


def model_root(folder: Path) -> Path:
    """Where serving.yaml is: ``folder`` itself, or its only subfolder (archives made of a folder)."""
    if (folder / SERVING_FILE).is_file():
        return folder
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir() and (entries[0] / SERVING_FILE).is_file():
        return entries[0]
    raise ArchiveError(f"the archive has no {SERVING_FILE} at its root")


def _unpack_tar(archive: Path, target: Path, max_bytes: int) -> None:
    total = 0
    try:
        with tarfile.open(archive) as tar:
            for member in tar:
                relative = _checked_member_path(member.name)
                if member.isdir():
                    (target / relative).mkdir(parents=True, exist_ok=True)
                    continue
                if not member.isfile():
                    raise ArchiveError(f"archive member {member.name!r} is a link or device; only files are allowed")
                total += member.size
                if total > max_bytes:
                    raise ArchiveError(f"the archive unpacks to more than {max_bytes} bytes")
                source = tar.extractfile(member)
                if source is None:
                    raise ArchiveError(f"archive member {member.name!r} cannot be read")
                destination = target / relative
                destination.parent.mkdir(parents=True, exist_ok=True)
                with source, destination.open("wb") as out:
                    shutil.copyfileobj(source, out)
    except _DAMAGED as exc:
        raise ArchiveError(f"the archive is damaged: {exc}") from exc


def _unpack_zip(archive: Path, target: Path, max_bytes: int) -> None:
    total = 0
    try:
        with zipfile.ZipFile(archive) as bundle:
            for info in bundle.infolist():
                relative = _checked_member_path(info.filename)
                if info.is_dir():
                    (target / relative).mkdir(parents=True, exist_ok=True)
                    continue
                # Unix mode bits in external_attr: refuse symlinks stored by zip -y.
                if (info.external_attr >> 16) & 0o170000 == 0o120000:
                    raise ArchiveError(f"archive member {info.filename!r} is a link; only files are allowed")
                total += info.file_size
                if total > max_bytes:
                    raise ArchiveError(f"the archive unpacks to more than {max_bytes} bytes")
                destination = target / relative
                destination.parent.mkdir(parents=True, exist_ok=True)
                with bundle.open(info) as source, destination.open("wb") as out:
                    shutil.copyfileobj(source, out)
    except _DAMAGED as exc:
        raise ArchiveError(f"the archive is damaged: {exc}") from exc
