"""The artifact store (service/storage.py) on a real S3-compatible server (SeaweedFS) and on a
second local directory (`file://`), and in place: units complete only with their manifest,
staging checked and cached, eviction, TensorBoard sync, deletes, errors."""

from __future__ import annotations

import json
import os
import tarfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.settings import Settings
from service.storage import MANIFEST, Storage, StorageError, archive_dir
from tests.s3server import SeaweedS3


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed")).start()
    try:
        server.make_bucket("units")
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["s3", "file"])
def remote(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    """A remote store (a fresh prefix each test) and its own data and cache directories."""
    data = tmp_path / "data"
    if request.param == "s3":
        server: SeaweedS3 = request.getfixturevalue("s3")
        env = server.env(f"s3://units/{uuid.uuid4().hex}")
    else:
        env = {"MTL_STORAGE_URL": f"file://{tmp_path / 'bucket'}"}
    settings = Settings(
        **{k.removeprefix("MTL_").lower(): v for k, v in env.items()}, data_dir=data
    )
    return Storage.from_settings(settings)


def _unit(folder: Path, files: dict[str, bytes]) -> Path:
    for rel, body in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(body)
    return folder


FILES = {
    "mtl.json": b'{"tasks": []}',
    "model.safetensors": os.urandom(300_000),
    "1_Pooling/config.json": b"{}",
}


def test_a_unit_round_trips_with_its_manifest(remote: Storage, tmp_path: Path) -> None:
    unit = _unit(tmp_path / "model", FILES)
    manifest = remote.put_dir(unit, "jobs/j1/a1/model")
    assert sorted(manifest["files"]) == sorted(FILES)
    assert remote.manifest("jobs/j1/a1/model") == manifest
    assert remote.children("jobs/j1/a1/model") == sorted(
        ["1_Pooling", MANIFEST, "mtl.json", "model.safetensors"]
    )
    staged = remote.stage_dir("jobs/j1/a1/model")
    assert staged != unit and staged.is_relative_to(remote.cache_dir)
    for rel, body in FILES.items():
        assert (staged / rel).read_bytes() == body
    # a second stage uses the local copy, without asking the store
    assert remote.stage_dir("jobs/j1/a1/model") == staged


def test_a_unit_without_its_manifest_is_never_staged(remote: Storage, tmp_path: Path) -> None:
    """A crash mid-upload: the files are there, the manifest (written last) is not."""
    unit = _unit(tmp_path / "ckpt", FILES)
    for rel in FILES:
        remote.put_file(unit / rel, f"jobs/j2/a1/checkpoints/step-00000010/{rel}")
    assert remote.manifest("jobs/j2/a1/checkpoints/step-00000010") is None
    with pytest.raises(StorageError, match="upload never finished"):
        remote.stage_dir("jobs/j2/a1/checkpoints/step-00000010")
    with pytest.raises(StorageError, match="upload never finished"):
        remote.fetch_dir("jobs/j2/a1/checkpoints/step-00000010", tmp_path / "out")


def test_a_changed_or_missing_file_fails_the_check(remote: Storage, tmp_path: Path) -> None:
    unit = _unit(tmp_path / "model", FILES)
    remote.put_dir(unit, "u/changed")
    remote.put_file(_unit(tmp_path / "other", {"x": b"not the weights"}) / "x",
                    "u/changed/model.safetensors")  # fmt: skip
    with pytest.raises(StorageError, match=r"model\.safetensors does not match its manifest"):
        remote.stage_dir("u/changed")
    assert not remote.staged_path("u/changed").exists()  # nothing half-staged is left
    assert not list((remote.cache_dir / "staged" / "u").glob(".*tmp*"))

    remote.put_dir(unit, "u/missing")
    remote.delete("u/missing/mtl.json")
    with pytest.raises(StorageError, match=r"mtl\.json is listed in its manifest but missing"):
        remote.fetch_dir("u/missing", tmp_path / "out")


def test_corrupt_manifest_is_a_storage_error(remote: Storage, tmp_path: Path) -> None:
    remote.put_file(_unit(tmp_path / "m", {MANIFEST: b"{not json"}) / MANIFEST, f"u/bad/{MANIFEST}")
    with pytest.raises(StorageError, match="manifest of u/bad is corrupt"):
        remote.manifest("u/bad")


def test_objects_stream_and_delete(remote: Storage, tmp_path: Path) -> None:
    unit = _unit(tmp_path / "model", FILES)
    archive = archive_dir(unit, tmp_path / "model.tar.gz", "model")
    remote.put_file(archive, "jobs/j3/a2/model.tar.gz")
    remote.put_dir(unit, "jobs/j3/a2/model")
    assert remote.size("jobs/j3/a2/model.tar.gz") == archive.stat().st_size
    with remote.open("jobs/j3/a2/model.tar.gz") as fh:
        assert fh.read() == archive.read_bytes()
    with tarfile.open(archive) as tar:  # the archive leaves manifests out
        assert sorted(tar.getnames()) == sorted(
            ["model", "model/1_Pooling", *(f"model/{r}" for r in FILES)]
        )
    staged = remote.stage_dir("jobs/j3/a2/model")
    remote.delete("jobs/j3")
    assert not remote.exists("jobs/j3/a2/model.tar.gz")
    assert list(remote.fetch_tree("jobs/j3", tmp_path / "left").rglob("*")) == []
    assert not staged.exists()  # this host's copy goes with it
    with pytest.raises(FileNotFoundError):
        remote.open("jobs/j3/a2/model.tar.gz").read()
    remote.delete("jobs/never-there")  # missing is fine


def test_tensorboard_trees_sync_only_what_grew(remote: Storage, tmp_path: Path) -> None:
    logs = _unit(tmp_path / "tb", {"events.out.1": b"a" * 10, "sub/events.out.2": b"b"})
    assert remote.sync_tree(logs, "jobs/j4/tensorboard") == 2
    assert remote.sync_tree(logs, "jobs/j4/tensorboard") == 0
    (logs / "events.out.1").write_bytes(b"a" * 20)
    assert remote.sync_tree(logs, "jobs/j4/tensorboard") == 1
    out = remote.fetch_tree("jobs/j4/tensorboard", tmp_path / "back")
    assert (out / "events.out.1").read_bytes() == b"a" * 20
    assert (out / "sub" / "events.out.2").read_bytes() == b"b"
    assert list(remote.fetch_tree("jobs/none/tensorboard", tmp_path / "empty").iterdir()) == []


def test_the_cache_evicts_least_recently_used_units(remote: Storage, tmp_path: Path) -> None:
    remote.cache_max_bytes = 700_000  # two units of ~300 kB fit, three do not
    for name in ("a", "b", "c"):
        remote.put_dir(_unit(tmp_path / name, FILES), f"u/{name}")
    a = remote.stage_dir("u/a")
    b = remote.stage_dir("u/b")
    old = time.time() - 3600  # `a` and `b` last used an hour ago, `a` before `b`
    os.utime(a / ".staged.json", (old - 10, old - 10))
    os.utime(b / ".staged.json", (old, old))
    c = remote.stage_dir("u/c")
    assert not a.exists() and b.exists() and c.exists()
    # units used within the grace period stay even over the size (a reader may be opening them)
    remote.cache_max_bytes = 1
    remote.stage_dir("u/a")
    assert b.exists() is False and c.exists() and remote.staged_path("u/a").exists()


def test_in_place_copies_nothing(tmp_path: Path) -> None:
    storage = Storage.from_settings(Settings(data_dir=tmp_path / "data"))
    assert storage.in_place
    folder = storage.local("jobs/j5/model")
    _unit(folder, FILES)
    assert storage.put_dir(folder, "jobs/j5/model") == {}  # already there: no manifest either
    assert not (folder / MANIFEST).exists()
    assert storage.stage_dir("jobs/j5/model") == folder
    other = _unit(tmp_path / "elsewhere", {"data.csv": b"text\nhi\n"})
    storage.put_dir(other, "datasets/ds_1")
    assert (storage.local("datasets/ds_1") / "data.csv").read_bytes() == b"text\nhi\n"
    storage.delete("jobs/j5")
    assert not folder.exists()
    with pytest.raises(StorageError, match="not in"):
        storage.stage_dir("jobs/j5/model")


def test_an_unreachable_store_is_a_storage_error(tmp_path: Path) -> None:
    from service.embedded import free_port

    settings = Settings(
        data_dir=tmp_path,
        storage_url="s3://nowhere/x",
        s3_endpoint_url=f"http://127.0.0.1:{free_port()}",
        s3_access_key_id="k",
        s3_secret_access_key="s",
    )
    storage = Storage.from_settings(settings)
    started = time.monotonic()
    with pytest.raises(StorageError, match="nowhere/x"):
        storage.stage_dir("jobs/x/a1/model")
    assert time.monotonic() - started < 30


@pytest.mark.parametrize(
    "url", ["bucket", "s3://", "s3:///", "://x"], ids=["no scheme", "no root", "slash", "no name"]
)
def test_storage_url_must_name_a_root(url: str) -> None:
    with pytest.raises(ValueError, match="must be a URL with a scheme and a root"):
        Settings(storage_url=url)


def test_keys_cannot_leave_the_root(remote: Storage) -> None:
    for key in ("../x", "/etc/passwd", "a/../../b", "", "a//b"):
        with pytest.raises(ValueError, match="not a storage key"):
            remote.exists(key)


def test_manifests_are_plain_json(remote: Storage, tmp_path: Path) -> None:
    remote.put_dir(_unit(tmp_path / "m", {"f": b"12345"}), "u/m")
    manifest = remote.manifest("u/m")
    assert manifest is not None
    assert manifest["files"]["f"] == {
        "size": 5,
        "sha256": "5994471abb01112afcc18159f6cc74b4f511b99806da59b3caf5a9c173cacfc5",
    }
    assert json.loads(json.dumps(manifest)) == manifest
