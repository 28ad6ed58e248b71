"""Artifact storage: datasets, checkpoints, exported models and TensorBoard files, through fsspec.

One setting picks the store (`Settings.storage_url`, ``MTL_STORAGE_URL``):

* unset: the data directory itself, **in place**. Keys are paths under ``MTL_DATA_DIR``; a
  worker trains straight into ``<data_dir>/jobs/<id>`` and nothing is copied (the embedded
  `mtl serve` needs nothing set up). API and workers must then share that directory.
* ``s3://bucket/prefix`` (endpoint, credentials and region from the ``MTL_S3_*`` settings) or any
  other fsspec URL (``file:///mnt/share/mtl``, ``gs://``...): a **remote** store. Workers train in
  a local work folder and upload; API and workers share nothing but Redis and the bucket.

Keys are ``/``-separated paths under the store's root (``datasets/<id>``, ``jobs/<id>/a3/model``).
A *unit* is a folder uploaded with `put_dir`: its files first, then ``manifest.json`` (every
file's size and SHA-256) last, so a unit without a manifest is incomplete (a crash mid-upload)
and is never staged. A unit is written once, under a key that is never reused (ids are unique,
a job's files are per attempt), so a reader may keep its copy. Readers stage units into a
bounded local cache (`stage_dir`): downloaded into a temporary folder, checked against the
manifest, then renamed into place, so concurrent
readers on one host never see half a unit; the least recently used units are evicted when the
cache is over its size (never one used in the last `CACHE_GRACE_S` seconds).

Who may write where is decided elsewhere: a job attempt uploads only under its own
``jobs/<id>/a<attempt>/`` prefix, and the pointers to what is current live in the job's Redis
record, written by fenced scripts (see `worker.artifacts`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tarfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

__all__ = [
    "ARCHIVES",
    "MANIFEST",
    "Storage",
    "StorageError",
    "archive_dir",
    "ensemble_key",
    "job_key",
    "manifest_of",
    "write_archives",
]

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STAGED = ".staged.json"
#: a staged unit used this recently is never evicted (a reader may still be opening its files)
CACHE_GRACE_S = 120.0
_CHUNK = 1024 * 1024


class StorageError(RuntimeError):
    """The store cannot be read or written, or holds no complete unit under a key."""


class BadKey(ValueError):
    """A key that is not a plain relative path (a bug in the caller, never the store's)."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and not p.is_symlink() and p.name != STAGED
    )


def manifest_of(folder: Path) -> dict[str, Any]:
    """Every file under `folder` (relative POSIX path -> size and SHA-256), but a manifest."""
    files = {}
    for path in _files(folder):
        rel = path.relative_to(folder).as_posix()
        if rel == MANIFEST:
            continue
        files[rel] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    return {"version": 1, "files": files}


def archive_dir(folder: Path, target: Path, arcname: str, *, onnx_only: bool = False) -> Path:
    """`folder` as a .tar.gz at `target` (top folder `arcname`), written atomically; the
    manifest and staging marker are left out. `onnx_only`: a model folder without its PyTorch
    weights (``*.safetensors``): the ONNX graphs, the tokenizer and ``mtl.json``, what
    `mtl.ort_predict` loads."""
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex}")

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        name = PurePosixPath(info.name).name
        if name in (MANIFEST, STAGED):
            return None
        if onnx_only and info.isfile() and name.endswith(".safetensors"):
            return None
        return info

    try:
        with tarfile.open(tmp, "w:gz") as tar:
            tar.add(folder, arcname=arcname, filter=keep)
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


# ---------------------------------------------------------------------- the store's layout
#: a model's archives beside its folder, by download format
ARCHIVES = {"pytorch": "model.tar.gz", "onnx": "model.onnx.tar.gz"}


def write_archives(model_dir: Path) -> dict[str, Path]:
    """The model's archives beside its folder (`ARCHIVES`; ONNX only when it has an export)."""
    from mtl.ort_predict import has_onnx

    out = {"pytorch": archive_dir(model_dir, model_dir.with_name(ARCHIVES["pytorch"]), "model")}
    if has_onnx(model_dir):
        target = model_dir.with_name(ARCHIVES["onnx"])
        out["onnx"] = archive_dir(model_dir, target, "model", onnx_only=True)
    return out


def job_key(job_id: str) -> str:
    """A job's files: ``model/``, ``model.tar.gz``, ``checkpoints/``, ``tensorboard/`` (in place),
    or ``a<attempt>/model``... per attempt (remote); the record's ``artifacts`` names which."""
    return f"jobs/{_check_key(job_id)}"


def ensemble_key(ensemble_id: str) -> str:
    """An ensemble's files: ``model/`` and ``model.tar.gz``."""
    return f"ensembles/{_check_key(ensemble_id)}"


def _check_key(key: str) -> str:
    parts = key.split("/")
    if any(p in ("..", ".", "") for p in parts) or "\\" in key or "\x00" in key:
        raise BadKey(f"not a storage key: {key!r}")
    return key


@dataclass
class Storage:
    """One artifact store; see the module docs. Thread-safe (fsspec filesystems are)."""

    url: str | None
    data_dir: Path
    cache_dir: Path
    cache_max_bytes: int = 20 * 1024**3
    options: dict[str, Any] = field(default_factory=dict)
    _fs: Any = field(default=None, init=False, repr=False)
    _root: str = field(default="", init=False, repr=False)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        self.cache_dir = Path(self.cache_dir)
        if self.url:
            from fsspec.core import url_to_fs

            self._fs, root = url_to_fs(self.url, **self.options)
            self._root = str(root).rstrip("/")

    @classmethod
    def from_settings(cls, settings: Any) -> Storage:
        options: dict[str, Any] = {}
        url = settings.storage_url
        if url and url.startswith(("s3://", "s3a://")):
            client: dict[str, Any] = {}
            if settings.s3_endpoint_url:
                client["endpoint_url"] = settings.s3_endpoint_url
            if settings.s3_region:
                client["region_name"] = settings.s3_region
            options["client_kwargs"] = client
            # a store that is away fails a call in seconds (the worker retries uploads itself)
            options["config_kwargs"] = {
                "connect_timeout": 5,
                "read_timeout": 60,
                "retries": {"max_attempts": 3, "mode": "standard"},
            }
            if settings.s3_access_key_id is not None:
                options["key"] = settings.s3_access_key_id.get_secret_value()
            if settings.s3_secret_access_key is not None:
                options["secret"] = settings.s3_secret_access_key.get_secret_value()
            # a fresh listing every time: other hosts write units we must see at once
            options["use_listings_cache"] = False
            options["skip_instance_cache"] = True
        elif url and url.startswith("file://"):
            options["auto_mkdir"] = True
        return cls(
            url=url,
            data_dir=settings.data_dir,
            cache_dir=settings.cache_dir or settings.data_dir / "cache",
            cache_max_bytes=settings.cache_max_bytes,
            options=options,
        )

    # ------------------------------------------------------------------ where things are
    @property
    def in_place(self) -> bool:
        """True when the store is the data directory itself (nothing is copied)."""
        return self._fs is None

    def local(self, key: str) -> Path:
        """The in-place path of `key` (in place only)."""
        assert self.in_place, "a remote store has no local paths: stage instead"
        return self.data_dir / _check_key(key)

    def _path(self, key: str) -> str:
        return f"{self._root}/{_check_key(key)}"

    def describe(self) -> str:
        return f"{self.data_dir} (in place)" if self.in_place else str(self.url)

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except (StorageError, FileNotFoundError, BadKey):
            raise
        except Exception as exc:  # botocore, aiohttp, OSError: the store is away or refuses
            raise StorageError(f"{what} in {self.describe()}: {type(exc).__name__}: {exc}") from exc

    # ------------------------------------------------------------------ objects
    def exists(self, key: str) -> bool:
        if self.in_place:
            return self.local(key).exists()
        with self._errors(f"cannot look up {key}"):
            return bool(self._fs.exists(self._path(key)))

    def size(self, key: str) -> int:
        if self.in_place:
            return self.local(key).stat().st_size
        with self._errors(f"cannot look up {key}"):
            return int(self._fs.info(self._path(key))["size"])

    def open(self, key: str) -> IO[bytes]:
        """A binary reader of one object (for streaming a download). FileNotFoundError when
        there is none."""
        if self.in_place:
            return open(self.local(key), "rb")
        with self._errors(f"cannot read {key}"):
            return self._fs.open(self._path(key), "rb", block_size=8 * _CHUNK)

    def put_file(self, local: Path, key: str) -> None:
        if self.in_place:
            target = self.local(key)
            if target.resolve() != Path(local).resolve():
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex}")
                shutil.copyfile(local, tmp)
                tmp.replace(target)
            return
        with self._errors(f"cannot upload {key}"):
            self._fs.put_file(str(local), self._path(key))

    def delete(self, key: str) -> None:
        """Remove `key` and everything under it; missing is fine."""
        if self.in_place:
            path = self.local(key)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            return
        with self._errors(f"cannot delete {key}"), contextlib.suppress(FileNotFoundError):
            self._fs.rm(self._path(key), recursive=True)
        self._evict_key(key)

    def children(self, key: str) -> list[str]:
        """Names directly under `key` (folders and objects); [] when there is nothing."""
        if self.in_place:
            path = self.local(key)
            return sorted(p.name for p in path.iterdir()) if path.is_dir() else []
        with self._errors(f"cannot list {key}"):
            try:
                entries = self._fs.ls(self._path(key), detail=False)
            except FileNotFoundError:
                return []
        return sorted(PurePosixPath(str(e)).name for e in entries)

    # ------------------------------------------------------------------ units (folders)
    def put_dir(self, local: Path, key: str) -> dict[str, Any]:
        """Upload the folder `local` as the unit `key`: every file, then its manifest last.
        Returns the manifest ({} in place when `local` already is the unit: nothing to do)."""
        local = Path(local)
        if self.in_place and self.local(key).resolve() == local.resolve():
            return {}  # written in place by an atomic rename already: nothing to do
        manifest = manifest_of(local)
        body = json.dumps(manifest, indent=1, sort_keys=True).encode()
        if self.in_place:
            target = self.local(key)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex}")
            shutil.copytree(local, tmp)
            _atomic_bytes(tmp / MANIFEST, body)
            if target.exists():
                shutil.rmtree(target)
            tmp.replace(target)
            return manifest
        with self._errors(f"cannot upload {key}"):
            for rel in manifest["files"]:
                self._fs.put_file(str(local / rel), self._path(f"{key}/{rel}"))
            self._fs.pipe_file(self._path(f"{key}/{MANIFEST}"), body)
        return manifest

    def manifest(self, key: str) -> dict[str, Any] | None:
        """The manifest of unit `key`; None when the unit is missing or incomplete."""
        try:
            if self.in_place:
                raw = (self.local(key) / MANIFEST).read_bytes()
            else:
                with self._errors(f"cannot read {key}/{MANIFEST}"):
                    raw = self._fs.cat_file(self._path(f"{key}/{MANIFEST}"))
        except FileNotFoundError:
            return None
        try:
            manifest = json.loads(raw)
            manifest["files"].items()
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StorageError(f"the manifest of {key} is corrupt: {exc}") from exc
        return manifest

    def fetch_dir(self, key: str, local: Path) -> Path:
        """Download the complete unit `key` into the new folder `local` (checked against its
        manifest). StorageError when the unit is missing, incomplete or does not match."""
        manifest = self.manifest(key)
        if manifest is None:
            raise StorageError(f"{key} is not in {self.describe()} (or its upload never finished)")
        local = Path(local)
        local.mkdir(parents=True, exist_ok=False)
        for rel, meta in manifest["files"].items():
            _check_key(rel)
            target = local / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                if self.in_place:
                    shutil.copyfile(self.local(f"{key}/{rel}"), target)
                else:
                    with self._errors(f"cannot download {key}/{rel}"):
                        self._fs.get_file(self._path(f"{key}/{rel}"), str(target))
            except FileNotFoundError as exc:
                raise StorageError(f"{key}/{rel} is listed in its manifest but missing") from exc
            if target.stat().st_size != meta["size"] or _sha256(target) != meta["sha256"]:
                raise StorageError(f"{key}/{rel} does not match its manifest")
        _atomic_bytes(local / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
        return local

    def fetch_tree(self, key: str, local: Path) -> Path:
        """Download whatever is under `key` into `local` (no manifest: TensorBoard logs, which
        only ever grow). An empty or missing `key` gives an empty folder."""
        local = Path(local)
        local.mkdir(parents=True, exist_ok=True)
        if self.in_place:
            source = self.local(key)
            if source.is_dir():
                shutil.copytree(source, local, dirs_exist_ok=True)
            return local
        with self._errors(f"cannot download {key}"):
            try:
                found = self._fs.find(self._path(key))
            except FileNotFoundError:
                found = []
            prefix = self._path(key) + "/"
            for remote in found:
                rel = str(remote)[len(prefix) :] if str(remote).startswith(prefix) else None
                if not rel:
                    continue
                _check_key(rel)
                target = local / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                self._fs.get_file(remote, str(target))
        return local

    def sync_tree(self, local: Path, key: str) -> int:
        """Upload the files under `local` whose size differs from the stored copy (TensorBoard
        event files only grow). Returns how many were uploaded. No-op in place."""
        if self.in_place or not Path(local).is_dir():
            return 0
        sent = 0
        with self._errors(f"cannot upload {key}"):
            try:
                stored = {
                    str(p)[len(self._path(key)) + 1 :]: int(info["size"])
                    for p, info in self._fs.find(self._path(key), detail=True).items()
                }
            except FileNotFoundError:
                stored = {}
            for path in _files(Path(local)):
                rel = path.relative_to(local).as_posix()
                if stored.get(rel) != path.stat().st_size:
                    self._fs.put_file(str(path), self._path(f"{key}/{rel}"))
                    sent += 1
        return sent

    # ------------------------------------------------------------------ the local cache
    def stage_dir(self, key: str) -> Path:
        """A local folder holding the complete unit `key`: its own path in place, else a copy
        in the cache (downloaded once and checked against the manifest; units are written once
        under keys that are never reused, so a complete copy is used without asking the store
        again)."""
        if self.in_place:
            path = self.local(key)
            if not path.is_dir():
                raise StorageError(f"{key} is not in {self.describe()}")
            return path
        target = self._cache_path(key)
        marker = target / STAGED
        if marker.is_file():  # units are written once: a complete local copy stays right
            with contextlib.suppress(OSError):
                marker.touch()
                return target
        manifest = self.manifest(key)
        if manifest is None:
            raise StorageError(f"{key} is not in {self.describe()} (or its upload never finished)")
        tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex}")
        try:
            self.fetch_dir(key, tmp)
            size = sum(meta["size"] for meta in manifest["files"].values())
            (tmp / STAGED).write_text(json.dumps({"key": key, "bytes": size}))
            old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex}")
            with contextlib.suppress(FileNotFoundError):
                target.rename(old)  # a stale copy (the unit was replaced)
            with contextlib.suppress(OSError):  # another process staged it meanwhile: theirs
                tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self._evict(keep=target)
        return target

    def staged_path(self, key: str) -> Path:
        """Where `stage_dir(key)` puts (or finds) the unit locally."""
        return self.local(key) if self.in_place else self._cache_path(key)

    def _cache_path(self, key: str) -> Path:
        return self.cache_dir / "staged" / _check_key(key)

    def _evict_key(self, key: str) -> None:
        shutil.rmtree(self._cache_path(key), ignore_errors=True)

    def cached_units(self) -> list[tuple[float, int, Path]]:
        """(last use, bytes, folder) of every staged unit in the cache."""
        out: list[tuple[float, int, Path]] = []
        root = self.cache_dir / "staged"
        if not root.is_dir():
            return out
        for marker in root.rglob(STAGED):
            try:
                size = int(json.loads(marker.read_text())["bytes"])
                out.append((marker.stat().st_mtime, size, marker.parent))
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return sorted(out)

    def _evict(self, keep: Path) -> None:
        units = self.cached_units()
        total = sum(size for _, size, _ in units)
        now = time.time()
        for used, size, folder in units:
            if total <= self.cache_max_bytes:
                break
            if folder == keep or now - used < CACHE_GRACE_S:
                continue
            shutil.rmtree(folder, ignore_errors=True)
            total -= size
            log.info("evicted %s from the cache (%d bytes)", folder, size)

    def work_dir(self, name: str) -> Path:
        """A fresh local folder for one attempt's files (remote stores)."""
        path = self.cache_dir / "work" / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path


def _atomic_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)
