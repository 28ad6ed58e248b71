"""Predict with an exported model's ONNX graph on ONNX Runtime, without torch.

`OrtPredictor.load(model_dir).predict(texts)` answers exactly like `mtl.predict.Predictor`:
one dict per text, `{task: {"label", "probabilities": {label: p}}}`, tasks in config order,
labels in the model's order; the texts are tokenised by the model's own tokenizer (transformers'
`AutoTokenizer`, which imports without torch) with the same truncation to `max_length` and
padding per chunk of `batch_size` texts, in the order given, as `Predictor` does. This module
imports numpy, onnxruntime and transformers' tokenizers only, never torch.

`load_predictor(model_dir, prefer=...)` is the one loader for servers: ONNX Runtime when the
folder has an ONNX export (`mtl.json`'s "onnx", written by `mtl.onnx`), PyTorch
(`mtl.predict.Predictor`, torch imported only then) otherwise. An ensemble folder runs on ONNX
Runtime when every member has an ONNX export, on PyTorch otherwise. Where torch is not installed
(the lean API install, `mtl-jobs[api]`), a folder that needs PyTorch is a `TorchRequired` error
that says what is missing, not an ImportError.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from mtl.errors import ModelError, TorchRequired
from mtl.layout import EMBEDDING_OUTPUT, MTL_FILE, ONNX_INPUTS, ONNX_KEY

if TYPE_CHECKING:
    from mtl.ensemble import EnsemblePredictor
    from mtl.predict import Predictor

__all__ = [
    "OrtPredictor",
    "Prefer",
    "has_onnx",
    "load_predictor",
    "onnx_entry",
    "prediction_rows",
    "torch_installed",
]

Prefer = Literal["auto", "onnx", "torch"]

_INSTALL = "pip install 'mtl-jobs[onnx]'"


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Hide what transformers logs while it loads (e.g. that torch is not installed, or
    BERT's unused pooler)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _read_meta(model_dir: Path) -> dict[str, Any]:
    try:
        meta = json.loads((model_dir / MTL_FILE).read_text(encoding="utf-8"))
        if not isinstance(meta, dict):
            raise ValueError(f"{MTL_FILE} is not an object")
    except (OSError, ValueError) as exc:
        raise ModelError(f"{model_dir}: not an exported mtl model ({exc})") from exc
    return meta


def onnx_entry(meta: dict[str, Any]) -> dict[str, Any] | None:
    """`mtl.json`'s "onnx" entry, or None when the folder has no ONNX export."""
    entry = meta.get(ONNX_KEY)
    return entry if isinstance(entry, dict) else None


def _members(model_dir: Path, meta: dict[str, Any]) -> list[Path]:
    try:
        return [model_dir / str(m["path"]) for m in meta["members"]]
    except (KeyError, TypeError) as exc:
        raise ModelError(f"{model_dir}: not an exported mtl ensemble ({exc!r})") from None


def has_onnx(model_dir: str | Path) -> bool:
    """Whether the folder has an ONNX export (an ensemble: every member has one)."""
    model_dir = Path(model_dir)
    meta = _read_meta(model_dir)
    if meta.get("kind") == "ensemble":
        members = _members(model_dir, meta)
        try:
            return bool(members) and all(has_onnx(m) for m in members)
        except ModelError:  # a broken member: the PyTorch path says which and why
            return False
    return onnx_entry(meta) is not None


def torch_installed() -> bool:
    """Whether torch can be imported here (found, not imported: this costs no import)."""
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):  # a broken or half-removed install
        return False


def _onnx_missing(model_dir: Path) -> str:
    """Why the folder has no usable ONNX export, without naming paths."""
    meta = _read_meta(model_dir)
    if meta.get("kind") != "ensemble":
        return "the model has no ONNX export"
    lacking = []
    for i, member in enumerate(_members(model_dir, meta)):
        try:
            if not has_onnx(member):
                lacking.append(i)
        except ModelError:
            lacking.append(i)
    if not lacking:  # has_onnx said no: an ensemble without members
        return "the ensemble has no members with an ONNX export"
    if len(lacking) == 1:
        return f"member {lacking[0]} of the ensemble has no ONNX export"
    return f"members {', '.join(map(str, lacking))} of the ensemble have no ONNX export"


def _torch_required(model_dir: Path, reason: str) -> TorchRequired:
    return TorchRequired(
        f"{model_dir}: {reason}, and PyTorch, which would predict without one, is not installed: "
        f"add the export with `mtl export {model_dir} --onnx` (where torch is installed) or "
        "install torch (pip install 'mtl-jobs[train]')",
        reason,
    )


def _softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float32)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    out: np.ndarray = e / e.sum(axis=-1, keepdims=True)
    return out


class OrtPredictor:
    """The ONNX Runtime twin of `mtl.predict.Predictor` (same `labels`, `task_names`,
    `max_length`, `meta` and `predict`). `session.run` is thread-safe; the tokenizer is not
    meant to be shared by threads that tokenise at once (callers lock around `predict`)."""

    def __init__(
        self, session: Any, tokenizer: Any, meta: dict[str, Any], model_file: Path
    ) -> None:
        self.session = session
        self.tokenizer = tokenizer
        self.meta = meta
        self.model_file = model_file
        self.labels: dict[str, list[str]] = {t["name"]: list(t["labels"]) for t in meta["tasks"]}
        self.max_length = int(meta["max_length"])

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        *,
        int8: bool | None = None,
        intra_op_threads: int | None = None,
    ) -> OrtPredictor:
        """The predictor of an exported model folder with an ONNX export. `int8`: None uses the
        int8 graph when the export has one (it was asked for), True requires it, False uses
        the fp32 graph. `intra_op_threads`: onnxruntime's threads per `run` (None: its
        default, one per physical core). Raises `ModelError` when the folder has no usable
        ONNX export or onnxruntime is not installed."""
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ModelError(f"ONNX prediction needs onnxruntime ({exc}): {_INSTALL}") from None
        model_dir = Path(model_dir)
        meta = _read_meta(model_dir)
        if meta.get("kind") == "ensemble":
            raise ModelError(f"{model_dir}: an ensemble; load it with load_predictor")
        entry = onnx_entry(meta)
        if entry is None:
            raise ModelError(
                f"{model_dir}: the model has no ONNX export (mtl export {model_dir} --onnx)"
            )
        try:
            fp32_file = str(entry["file"])
            int8_file = entry.get("int8")
            outputs = [str(o) for o in entry["outputs"]]
            tasks = [str(t["name"]) for t in meta["tasks"]]
            int(meta["max_length"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(
                f"{model_dir}: {MTL_FILE} has a broken 'onnx' entry ({exc!r})"
            ) from None
        if int8 and not int8_file:
            raise ModelError(
                f"{model_dir}: the ONNX export has no int8 graph (mtl export {model_dir} "
                "--onnx --int8)"
            )
        chosen = str(int8_file) if int8_file and int8 is not False else fp32_file
        model_file = model_dir / chosen
        root = model_dir.resolve()
        if Path(chosen).is_absolute() or root not in model_file.resolve().parents:
            raise ModelError(f"{model_dir}: the ONNX file {chosen!r} is outside the folder")
        if not model_file.is_file():
            raise ModelError(
                f"{model_dir}: the ONNX file {chosen} is missing; export it again with "
                f"`mtl export {model_dir} --onnx --force`"
            )
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: no warnings per session in server logs
        if intra_op_threads is not None:
            if intra_op_threads < 1:
                raise ModelError(f"intra_op_threads must be at least 1, got {intra_op_threads}")
            options.intra_op_num_threads = intra_op_threads
        try:
            session = ort.InferenceSession(
                str(model_file), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime's load errors share no base class
            raise ModelError(
                f"{model_dir}: cannot load the ONNX file {chosen} ({exc}); export it again "
                f"with `mtl export {model_dir} --onnx --force`"
            ) from None
        inputs = sorted(i.name for i in session.get_inputs())
        have = {o.name for o in session.get_outputs()}
        missing = [name for name in [*tasks, EMBEDDING_OUTPUT] if name not in have]
        if inputs != sorted(ONNX_INPUTS) or missing or set(tasks) - set(outputs):
            raise ModelError(
                f"{model_dir}: the ONNX file {chosen} does not fit the model (inputs {inputs}, "
                f"missing outputs {missing}); export it again with `mtl export {model_dir} "
                "--onnx --force`"
            )
        tokenizer = None
        if meta.get("has_tokenizer"):
            try:
                from transformers import AutoTokenizer

                with quiet_transformers():
                    tokenizer = AutoTokenizer.from_pretrained(model_dir)
            except (OSError, ValueError, KeyError) as exc:
                raise ModelError(f"{model_dir}: cannot load the tokenizer: {exc}") from exc
        return cls(session, tokenizer, meta, model_file)

    @property
    def task_names(self) -> list[str]:
        return list(self.labels)

    def predict(self, texts: list[str], batch_size: int = 64) -> list[dict[str, Any]]:
        if self.tokenizer is None:
            raise ModelError("this model was trained without a tokenizer and cannot read text")
        tasks = self.task_names
        results: list[dict[str, Any]] = []
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            enc = self.tokenizer(
                chunk,
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="np",
            )
            feed = {name: np.asarray(enc[name], dtype=np.int64) for name in ONNX_INPUTS}
            logits = self.session.run(tasks, feed)
            probs = {task: _softmax(v) for task, v in zip(tasks, logits, strict=True)}
            results += prediction_rows(probs, self.labels, len(chunk))
        return results


def prediction_rows(
    probs: dict[str, Any], labels: dict[str, list[str]], count: int
) -> list[dict[str, Any]]:
    """Per text, per task: the most probable label and every label's probability, from
    `probs[task]` (a `[count, classes]` array or tensor). Both predictors answer this way."""
    rows = []
    for i in range(count):
        row = {}
        for task, p in probs.items():
            names = labels[task]
            row[task] = {
                "label": names[int(p[i].argmax())],
                "probabilities": {n: float(p[i, j]) for j, n in enumerate(names)},
            }
        rows.append(row)
    return rows


def load_predictor(
    model_dir: str | Path,
    prefer: Prefer = "auto",
    *,
    device: str = "cpu",
    int8: bool | None = None,
    intra_op_threads: int | None = None,
) -> OrtPredictor | Predictor | EnsemblePredictor:
    """The predictor of an exported model or ensemble folder.

    `prefer`: "auto" runs ONNX Runtime when the folder has an ONNX export and onnxruntime is
    installed, PyTorch otherwise; "onnx" requires ONNX Runtime (a `ModelError` when the folder
    has no export or onnxruntime is missing); "torch" always uses `mtl.predict.Predictor` on
    `device`. An ONNX export that is named in `mtl.json` but missing or broken is a
    `ModelError` in "auto" too (never a silent switch to another engine). Where PyTorch would
    predict but torch is not installed: `TorchRequired` (its `reason` names what is missing),
    torch never imported. `int8` and `intra_op_threads` go to `OrtPredictor.load`."""
    if prefer not in ("auto", "onnx", "torch"):
        raise ModelError(f"prefer must be 'auto', 'onnx' or 'torch', not {prefer!r}")
    model_dir = Path(model_dir)
    use_onnx = False
    if prefer != "torch":
        use_onnx = has_onnx(model_dir)
        if prefer == "onnx" and not use_onnx:
            raise ModelError(
                f"{model_dir}: the model has no ONNX export (mtl export {model_dir} --onnx)"
            )
        if use_onnx and prefer == "auto":
            try:
                import onnxruntime  # noqa: F401
            except ImportError:
                use_onnx = False
    if not use_onnx:
        if not torch_installed():
            if prefer == "torch":
                reason = "PyTorch prediction was asked for"
            elif has_onnx(model_dir):  # but onnxruntime is missing
                reason = f"onnxruntime is not installed ({_INSTALL})"
            else:
                reason = _onnx_missing(model_dir)
            raise _torch_required(model_dir, reason)
        from mtl.predict import Predictor

        return Predictor.load(model_dir, device=device)

    def load(folder: Path) -> OrtPredictor:
        return OrtPredictor.load(folder, int8=int8, intra_op_threads=intra_op_threads)

    if _read_meta(model_dir).get("kind") == "ensemble":
        from mtl.ensemble import EnsemblePredictor

        return EnsemblePredictor.load(model_dir, load_member=load)
    return load(model_dir)
