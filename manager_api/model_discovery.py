"""`hydro up --models-dir DIR`: every sub-folder of DIR with a serving.yaml is a model, every change a new version.

Like the MODEL_DIRECTORY of the original Hydro Serving. The folder is polled (file names, sizes and mtimes: portable,
no inotify); a folder is looked at only once it has been quiet for ``quiet_period`` seconds, so a copy in progress
is never registered half-written. It is then packed reproducibly (``pack_model_to_file``) and its digest compared
with the artifact digest of the model's latest version: equal means nothing to do (a touch, a restart of the
watcher), different means a new version, uploaded through the manager's REST API with the admin token, so every
check of a push (archive safety, serving.yaml, signature against the model) applies unchanged.

A folder that is, or holds a file that is, a link leading out of DIR is refused (logged once, naming the file and
its target): its archive would copy that file out to anyone holding a token. Links that stay inside DIR are followed.

The model name is serving.yaml's ``name``, else the folder's name. A folder the manager refuses (4xx) is logged
with the manager's message and left alone until it changes again; a manager that cannot be reached, or answers
5xx, is retried with back-off. One bad folder never stops the others or the watcher.

Thread-safety: ``scan`` is called from one thread at a time (the watcher's own thread, or a test); ``status``
may be read from any thread (entries are replaced, never mutated in place).
"""

from __future__ import annotations

import enum
import logging
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import yaml

from manager_api.client import ApiError, ManagerClient, link_leaving, model_files, pack_model_to_file
from protos.topology.names import is_valid_name
from runtimes.serving_config import SERVING_FILE

log = logging.getLogger(__name__)

#: Status codes that say the folder itself is wrong: retrying the same files cannot help.
_FOLDER_ERRORS = frozenset({400, 404, 413, 422})
_MAX_BACKOFF = 30.0

#: (relative path, size, mtime in ns) of every file of a folder: a change of any of them is a change of the folder.
Fingerprint = tuple[tuple[str, int, int], ...]


class Action(enum.StrEnum):
    """What the watcher did with a folder when it last handled it."""

    registered = "registered"
    unchanged = "unchanged"
    failed = "failed"
    retrying = "retrying"


@dataclass(frozen=True)
class FolderStatus:
    """What the watcher knows about one model folder."""

    model: str
    fingerprint: Fingerprint
    #: Clock reading when ``fingerprint`` was first seen; the folder is handled once it is ``quiet_period`` old.
    changed_at: float
    #: The fingerprint last handled for good (registered, unchanged or refused); None: never handled yet.
    settled: Fingerprint | None = None
    #: How many times the folder was handled (each registration, no-op or failure counts once).
    handled: int = 0
    action: Action | None = None
    version: int | None = None
    error: str | None = None
    retry_at: float = 0.0
    attempts: int = 0


def fingerprint(folder: Path) -> Fingerprint:
    """Names, sizes and mtimes of the files that would be packed; raises OSError if the folder moves meanwhile."""
    entries = []
    for path in model_files(folder):
        stat = path.stat()
        entries.append((str(path.relative_to(folder)), stat.st_size, stat.st_mtime_ns))
    return tuple(entries)


def model_name(folder: Path) -> str:
    """serving.yaml's ``name`` if it has one, else the folder's name (the manager reports a broken serving.yaml)."""
    try:
        raw = yaml.safe_load((folder / SERVING_FILE).read_text(encoding="utf-8", errors="replace"))
    except (OSError, yaml.YAMLError):
        return folder.name
    name = raw.get("name") if isinstance(raw, dict) else None
    return name if isinstance(name, str) and name else folder.name


class ModelDiscovery:
    """Watches one folder of model folders and registers new or changed ones through the manager's API."""

    def __init__(
        self,
        models_dir: Path,
        api: ManagerClient,
        *,
        quiet_period: float = 2.0,
        poll_interval: float = 0.5,
    ) -> None:
        self.models_dir = models_dir
        self.api = api
        self.quiet_period = quiet_period
        self.poll_interval = poll_interval
        #: Keyed by sub-folder name.
        self.status: dict[str, FolderStatus] = {}
        #: Completed scans, so callers can wait for the watcher to have looked again.
        self.scans = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- the loop -------------------------------------------------------------------------------------------

    def start(self) -> ModelDiscovery:
        """Scan every ``poll_interval`` seconds in a daemon thread until stop()."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="model-discovery", daemon=True)
        self._thread.start()
        log.info("watching %s for model folders (quiet period %.1f s)", self.models_dir, self.quiet_period)
        if not self.models_dir.is_dir():
            log.warning("%s is not a folder (yet): nothing to register until it is", self.models_dir)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the thread (a registration under way finishes first). Safe to call twice."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.scan()
            except Exception:
                # The watcher outlives anything one scan runs into (a folder vanishing, a full disk).
                log.exception("scanning %s failed; trying again", self.models_dir)
            self._stop.wait(self.poll_interval)

    # --- one pass -------------------------------------------------------------------------------------------

    def scan(self, now: float | None = None) -> None:
        """Look at every model folder once; handle those quiet for ``quiet_period`` and not handled as they are."""
        now = time.monotonic() if now is None else now
        seen = set()
        for folder in self._model_folders():
            seen.add(folder.name)
            try:
                current = fingerprint(folder)
            except OSError:
                continue  # files moving under us: a change in progress, looked at again next scan
            state = self.status.get(folder.name)
            if state is None or state.fingerprint != current:
                previous = state or FolderStatus(model=folder.name, fingerprint=current, changed_at=now)
                state = replace(previous, fingerprint=current, changed_at=now, retry_at=0.0, attempts=0)
                self.status[folder.name] = state
            due = now - state.changed_at >= self.quiet_period and now >= state.retry_at
            if due and state.settled != current:
                try:
                    self.status[folder.name] = self._handle(folder, state, now)
                except Exception as exc:
                    log.exception("model folder %s: unexpected error; trying again", folder)
                    self.status[folder.name] = self._retry_later(state, now, f"{type(exc).__name__}: {exc}")
        for gone in set(self.status) - seen:
            del self.status[gone]
        self.scans += 1

    def _model_folders(self) -> list[Path]:
        if not self.models_dir.is_dir():
            return []
        return sorted(
            path
            for path in self.models_dir.iterdir()
            if path.is_dir() and not path.name.startswith(".") and (path / SERVING_FILE).is_file()
        )

    def _handle(self, folder: Path, state: FolderStatus, now: float) -> FolderStatus:
        name = model_name(folder)
        state = replace(state, model=name)
        if not is_valid_name(name):
            return self._refused(
                folder,
                state,
                f"{name!r} is not a valid model name: use 1 to 63 lower-case letters, digits, '-', '_' or '.', "
                "starting and ending with a letter or digit (rename the folder or set name: in serving.yaml)",
            )
        owner = self._folder_of(name, besides=folder.name)
        if owner is not None:
            # Two folders feeding one model would register each other's files in turn.
            return self._refused(folder, state, f"model {name!r} already comes from the folder {owner!r}")
        escape = self._link_out(folder)
        if escape is not None:
            return self._refused(folder, state, escape)
        with tempfile.TemporaryDirectory(prefix="hydro-discovery-") as scratch:
            packed = pack_model_to_file(folder, Path(scratch) / "model.tar.gz")
            after = fingerprint(folder)
            if after != state.fingerprint:
                # Written to while being packed: wait for a new quiet period rather than upload a mixture.
                return replace(state, fingerprint=after, changed_at=now)
            try:
                latest = self._latest_version(name)
                if latest is not None and latest[1] == packed.digest:
                    return self._settled(state, Action.unchanged, version=latest[0])
                registered = self.api.upload_model(name, packed)
            except ApiError as exc:
                if exc.status in _FOLDER_ERRORS:
                    return self._refused(folder, state, exc.message)
                return self._retry_later(state, now, str(exc))
            except httpx.HTTPError as exc:
                return self._retry_later(state, now, f"the manager is unreachable: {exc}")
        version = int(registered["version"])
        log.info("registered model %s version %d from %s", name, version, folder)
        return self._settled(state, Action.registered, version=version)

    def _link_out(self, folder: Path) -> str | None:
        """Why ``folder`` must not be packed, if it or one of its files links out of the models folder.

        The same check as registering from a server path (``link_leaving``): packing follows links and any token
        can download the archive, so a link out would copy a file from anywhere the manager can read.
        """
        root = self.models_dir.resolve()
        target = folder.resolve()
        if not target.is_relative_to(root):
            return f"the folder links to {target}, outside the models folder {root}"
        leaving = link_leaving(folder, (root,))
        if leaving is None:
            return None
        file, target = leaving
        return f"{file.relative_to(folder)} links to {target}, outside the models folder {root}"

    def _folder_of(self, model: str, besides: str) -> str | None:
        """The other folder that registered ``model`` (or found it up to date), if any."""
        for folder, status in self.status.items():
            if folder != besides and status.model == model and status.action in (Action.registered, Action.unchanged):
                return folder
        return None

    def _latest_version(self, name: str) -> tuple[int, str] | None:
        """(number, artifact digest) of the model's newest version, or None if it has none."""
        try:
            versions = self.api.get_model(name).get("versions", [])
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise
        if not versions:
            return None
        newest = max(versions, key=lambda v: int(v["version"]))
        return int(newest["version"]), str(newest["artifact"]["digest"])

    @staticmethod
    def _settled(state: FolderStatus, action: Action, *, version: int | None = None) -> FolderStatus:
        return replace(
            state, settled=state.fingerprint, handled=state.handled + 1, action=action, version=version, error=None
        )

    @staticmethod
    def _refused(folder: Path, state: FolderStatus, message: str) -> FolderStatus:
        log.error(
            "model folder %s (model %s) was not registered: %s; it is retried when it changes",
            folder,
            state.model,
            message,
        )
        return replace(
            state,
            settled=state.fingerprint,
            handled=state.handled + 1,
            action=Action.failed,
            version=None,
            error=message,
        )

    def _retry_later(self, state: FolderStatus, now: float, message: str) -> FolderStatus:
        delay = min(_MAX_BACKOFF, self.poll_interval * 2.0 ** (state.attempts + 1))
        log.warning("model folder %s: %s; retrying in %.1f s", state.model, message, delay)
        return replace(
            state,
            handled=state.handled + 1,
            action=Action.retrying,
            error=message,
            retry_at=now + delay,
            attempts=state.attempts + 1,
        )
