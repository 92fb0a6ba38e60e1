"""The content-addressed adapter store: one folder per distinct adapter content, safetensors only.

    <root>/objects/<key[:2]>/<key>/   adapter_config.json, adapter_model.safetensors,
                                      [chat_template.jinja], manifest.json
    <root>/staging/<pid>-<random>/    work in progress of one process

An object's key is the sha256 of its files' names and digests, so the same content is stored
once whatever it is called. An object is written under staging/, fsynced, its manifest written
last, and renamed into objects/ in one step: a reader finds it whole or not at all. A process
killed before the rename leaves only a staging folder, which the next `open` removes once its
process is gone; one killed after the rename but before its registry row leaves an object no
version names, which `collect_garbage` removes after a grace period.

`MirroredStore` (`--store-url`) adds a shared copy at an fsspec URL (s3://, gs://, file://...):
every object stored is uploaded there, manifest last, and an object missing or damaged in the
local store is fetched from there and checked against its key before use. Servers on several
machines then share adapters with no shared filesystem: each keeps a local store as its cache.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from hotpeft.adapters.errors import AdapterInvalid, AdapterUnavailable
from hotpeft.adapters.faults import failpoint
from hotpeft.adapters.format import CONFIG_FILE, WEIGHTS_FILE
from hotpeft.adapters.paths import UnsafePath, inside

TEMPLATE_FILE = "chat_template.jinja"
MANIFEST_FILE = "manifest.json"
CHECKED_FILE = ".checked.json"  # the weights' stat when they last hashed right (`checked_folder`)
RACY_S = 2.0  # a stat younger than this is not recorded as checked (see `checked_folder`)
STORED_FILES = (CONFIG_FILE, WEIGHTS_FILE, TEMPLATE_FILE)
_KEY = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class StoredObject:
    key: str  # content address
    weights_sha256: str
    size_bytes: int  # all stored files


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class AdapterStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.objects = self.root / "objects"
        self.staging_root = self.root / "staging"
        self.objects.mkdir(parents=True, exist_ok=True)
        self.staging_root.mkdir(parents=True, exist_ok=True)
        self._remove_dead_staging()

    def _remove_dead_staging(self) -> None:
        for entry in self.staging_root.iterdir():
            pid = entry.name.split("-", 1)[0]
            if not pid.isdigit() or not pid_alive(int(pid)):
                shutil.rmtree(entry, ignore_errors=True)

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """A fresh folder to assemble an object in; removed afterwards unless `put` moved it."""
        path = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=self.staging_root))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def path(self, key: str) -> Path:
        if not _KEY.fullmatch(key or ""):  # keys come from registry rows, which another process may write
            raise UnsafePath(f"not a store key: {key[:80]!r}")
        inside(self.objects, key[:2], key)
        return self.objects / key[:2] / key

    def exists(self, key: str) -> bool:
        return self._stored(key)

    def _stored(self, key: str) -> bool:
        """Whole in this (local) store."""
        return (self.path(key) / MANIFEST_FILE).is_file()

    @staticmethod
    def describe(folder: Path) -> tuple[str, dict[str, str], int]:
        """(content key, {file: sha256}, bytes) of the storable files of an adapter folder."""
        digests, size = {}, 0
        for name in STORED_FILES:
            f = folder / name
            if f.is_file():
                digests[name] = file_sha256(f)
                size += f.stat().st_size
        key = hashlib.sha256(json.dumps(sorted(digests.items())).encode()).hexdigest()
        return key, digests, size

    def put(self, staged: Path, manifest: dict) -> StoredObject:
        """Move a staged folder (from `staging()`) into the store as one object; idempotent.

        `staged` holds the adapter's files; `manifest` is hotpeft's description of them (kind,
        base fingerprint, ...), written last so that a folder with a manifest is complete.
        """
        for f in staged.iterdir():
            if f.name not in STORED_FILES:
                f.unlink()
        key, digests, size = self.describe(staged)
        if WEIGHTS_FILE not in digests or CONFIG_FILE not in digests:
            raise AdapterInvalid(f"an adapter needs {CONFIG_FILE} and {WEIGHTS_FILE}")
        target = self.path(key)
        stored = StoredObject(key, digests[WEIGHTS_FILE], size)
        if self._stored(key):
            if self._intact(target, digests):
                os.utime(target)  # fresh again for the garbage collector's grace period
                return stored
            # The same content was stored before and has since been damaged on disk: replace it.
            damaged = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-damaged-", dir=self.staging_root))
            os.rename(target, damaged / "object")
            shutil.rmtree(damaged, ignore_errors=True)
        for name in digests:
            _fsync(staged / name)
        manifest_tmp = staged / (MANIFEST_FILE + ".tmp")
        manifest_tmp.write_text(json.dumps({**manifest, "key": key, "files": digests, "size_bytes": size}, indent=1))
        _fsync(manifest_tmp)
        os.replace(manifest_tmp, staged / MANIFEST_FILE)
        _fsync(staged)
        failpoint("store.before-rename")
        target.parent.mkdir(exist_ok=True)
        try:
            os.rename(staged, target)
            renamed = True
        except OSError:
            if not self._stored(key):  # not a concurrent writer of the same content: a real failure
                raise
            renamed = False
        _fsync(target.parent)
        if renamed:  # its bytes hashed by describe() while the folder was ours alone: a stat of our own write
            self._remember(target, stored.weights_sha256, private=True)
        failpoint("store.after-rename")
        return stored

    @staticmethod
    def _intact(folder: Path, digests: dict[str, str]) -> bool:
        try:
            return all(file_sha256(folder / name) == digest for name, digest in digests.items())
        except OSError:
            return False

    def verified_folder(self, key: str, weights_sha256: str) -> Path:
        """The object's folder, after checking its weights still hash to what was registered."""
        return self.checked_folder(key, weights_sha256)[0]

    def checked_folder(self, key: str, weights_sha256: str) -> tuple[Path, bool]:
        """(the object's folder, whether its weights are untouched since they last hashed to what was
        registered). Untouched (same size, mtime, ctime, inode and device as recorded then) skips the
        hash: the store writes an object once and never changes it, so a file with the same stat is
        the file that was checked; any rewrite, truncation or copy over it changes the stat (ctime
        even when mtime is put back) and is hashed again. As in git's index, a stat younger than
        `RACY_S` when recorded is not trusted: a rewrite within the file system's timestamp tick
        could leave it unchanged. Bit rot that changes no stat is not caught (the values' NaN/Inf
        scan still runs on every read)."""
        folder = self.path(key)
        weights = folder / WEIGHTS_FILE
        if not weights.is_file():
            raise AdapterUnavailable(f"its stored weights (object {key[:12]}) are missing from the adapter store")
        if self._unchanged(folder, weights_sha256):
            return folder, True
        before = self._signature(weights)
        actual = file_sha256(weights)
        if actual != weights_sha256:
            raise AdapterUnavailable(f"its stored weights (object {key[:12]}) are corrupt: they hash to {actual[:12]}, "
                                     f"registered {weights_sha256[:12]}")
        self._remember(folder, weights_sha256, before)
        return folder, False

    @staticmethod
    def _signature(weights: Path) -> list[int]:
        st = weights.stat()
        return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]

    def _unchanged(self, folder: Path, weights_sha256: str) -> bool:
        try:
            seen = json.loads((folder / CHECKED_FILE).read_text())
            return seen == {"sha256": weights_sha256, "stat": self._signature(folder / WEIGHTS_FILE)}
        except (OSError, ValueError):
            return False

    def _remember(self, folder: Path, weights_sha256: str, before: list[int] | None = None,
                  private: bool = False) -> None:
        """Record the stat of weights that hash right, unless they changed while hashed (`before`) or
        the stat is racy (too young, unless the file was `private` to this writer until now); best
        effort (a read-only store hashes every time)."""
        try:
            now = self._signature(folder / WEIGHTS_FILE)
            if before is not None and now != before:
                return
            if not private and time.time_ns() - max(now[1], now[2]) < RACY_S * 1e9:
                return
            tmp = folder / (CHECKED_FILE + f".{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_text(json.dumps({"sha256": weights_sha256, "stat": now}))
            os.replace(tmp, folder / CHECKED_FILE)
        except OSError:
            pass

    def keys(self) -> list[str]:
        return [p.name for p in self.objects.glob("*/*") if p.is_dir()]

    def collect_garbage(self, referenced: set[str], grace_s: float = 600.0) -> list[str]:
        """Remove objects no registry row names and older than `grace_s` (a registration in another
        process may be between writing its object and its row). Returns the removed keys."""
        removed = []
        now = time.time()
        for key in self.keys():
            path = self.path(key)
            if key in referenced:
                continue
            try:
                age = now - path.stat().st_mtime
            except FileNotFoundError:
                continue
            if age >= grace_s:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(key)
        return removed


class MirroredStore(AdapterStore):
    """A local store whose objects are also kept at an fsspec URL shared by every process."""

    def __init__(self, root: Path, url: str):
        import fsspec

        super().__init__(root)
        self.url = url
        self.fs, base = fsspec.core.url_to_fs(url)
        self.base = base.rstrip("/")

    def _remote(self, key: str) -> str:
        self.path(key)  # validates the key
        return f"{self.base}/objects/{key[:2]}/{key}"

    def _remote_exists(self, key: str) -> bool:
        return self.fs.exists(f"{self._remote(key)}/{MANIFEST_FILE}")

    def put(self, staged: Path, manifest: dict) -> StoredObject:
        """Store locally, then upload, also when the URL has the object already: registering the
        same content again is how a damaged copy is repaired, here as in the local store."""
        stored = super().put(staged, manifest)
        local, remote = self.path(stored.key), self._remote(stored.key)
        self.fs.makedirs(remote, exist_ok=True)  # object stores have no folders; a file system needs them
        for name in STORED_FILES:
            if (local / name).is_file():
                self.fs.put_file(str(local / name), f"{remote}/{name}")
        self.fs.put_file(str(local / MANIFEST_FILE), f"{remote}/{MANIFEST_FILE}")  # last: complete
        return stored

    def exists(self, key: str) -> bool:
        return super().exists(key) or self._remote_exists(key)

    def checked_folder(self, key: str, weights_sha256: str) -> tuple[Path, bool]:
        try:
            return super().checked_folder(key, weights_sha256)
        except AdapterUnavailable:
            if not self._fetch(key):
                raise
        return super().checked_folder(key, weights_sha256)

    def _fetch(self, key: str) -> bool:
        """Copy the shared object into the local store; False when the shared store lacks it."""
        remote = self._remote(key)
        try:
            manifest = json.loads(self.fs.cat_file(f"{remote}/{MANIFEST_FILE}"))
        except FileNotFoundError:
            return False
        with self.staging() as staged:
            for name in manifest.get("files", {}):
                if name not in STORED_FILES:
                    raise AdapterUnavailable(f"the shared store's object {key[:12]} lists a file {name!r} "
                                             "that adapters do not have")
                self.fs.get_file(f"{remote}/{name}", str(staged / name))
            extra = {k: v for k, v in manifest.items() if k not in ("key", "files", "size_bytes")}
            stored = AdapterStore.put(self, staged, extra)  # the key is recomputed from the content
        if stored.key != key:
            raise AdapterUnavailable(f"the shared store's object {key[:12]} holds other content "
                                     f"({stored.key[:12]}); re-register the adapter")
        return True


def open_store(root: Path, url: str | None = None) -> AdapterStore:
    """The local store at `root`, mirrored to `url` (fsspec) when one is given."""
    return AdapterStore(root) if not url else MirroredStore(root, url)
