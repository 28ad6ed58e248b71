"""Import boundaries and source rules: the library stays free of the service stack, the light
modules free of torch, no remote code, no unsafe torch.load."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

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
    "statement", ["import mtl", "import mtl.config", "import mtl.datafiles", "import mtl.errors"]
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


def module_level_imports(tree: ast.Module) -> list[tuple[int, str]]:
    """Imports that run at import time: module level, also inside if/try/with blocks there."""
    found: list[tuple[int, str]] = []
    stack: list[ast.stmt] = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.If | ast.Try | ast.With):
            for field in ("body", "orelse", "finalbody", "handlers"):
                for child in getattr(node, field, []):
                    stack += child.body if isinstance(child, ast.ExceptHandler) else [child]
    return found


def test_no_library_module_imports_the_service_stack_at_top_level() -> None:
    files = python_files("mtl")
    assert ROOT / "mtl" / "trainer.py" in files
    bad = []
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for line, name in module_level_imports(tree):
            if name.split(".")[0] in SERVICE_MODULES:
                bad.append(f"{path.relative_to(ROOT)}:{line}: import {name}")
    assert not bad, bad


def test_module_level_imports_finds_nested_imports() -> None:
    tree = ast.parse(
        "try:\n    import fastapi\nexcept ImportError:\n    pass\ndef f():\n    import celery\n"
    )
    assert module_level_imports(tree) == [(2, "fastapi")]


def test_no_trust_remote_code() -> None:
    pattern = re.compile(r"trust_remote_code\s*=\s*True")
    bad = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in python_files("mtl", "app", "worker")
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
