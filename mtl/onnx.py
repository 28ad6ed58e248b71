"""ONNX export of a multi-task model: the encoder, the pooling and every task head in one graph.

model/onnx/model.onnx         inputs `input_ids` and `attention_mask` (int64, `[batch, sequence]`,
                              both axes dynamic); outputs one logits tensor per task, named by
                              the task (`[batch, classes]`, config order), then `embedding` (the
                              pooled, optionally normalised sentence vector, `[batch, hidden]`)
model/onnx/model.int8.onnx    the same graph with the encoder's MatMuls on 8-bit integers
                              (uint8 weights per output channel, see `_quantize`;
                              `onnxruntime.quantization.quantize_dynamic`), only with int8
mtl.json's "onnx"             {"file", "int8" (the int8 file or null), "opset", "inputs", "outputs"}

The graph is `MultiTaskModel`'s own forward pass, traced: mask-aware mean / CLS / max pooling and
the L2 normalisation of `SentenceEncoder`, and the heads in `task_order`, each dependent head
reading the softmax of its parents' logits, exactly as in PyTorch. There is no `token_type_ids`
input: `SentenceEncoder` never passes one, so the encoder uses its all-zero default (BERT's
segment 0), and the graph does the same.

Exporter: the TorchScript-based one (`torch.onnx.export(..., dynamo=False)`). On torch 2.13 with
a transformers BERT it gives a correct graph with dynamic batch and sequence axes in 0.2-0.6 s
for the tests' tiny BERT (2.4-2.7 s for MiniLM-L6) on a busy 2-core machine, and needs only the
`onnx` package. The torch.export-based exporter (`dynamo=True`, torch's default since 2.9) also
gives a correct graph but takes 4-10 s for the same tiny model (the test suite exports ~100), needs
`onnxscript` as well, and names its graph values after the aten ops, so the required output name
`embedding` collides with the encoder's `embedding` op ("Duplicate definition of name"), which
only a rename of the graph's values would fix. torch warns that the TorchScript exporter is
deprecated (a DeprecationWarning, silenced here); torch 2.13 still ships it (pyproject pins
torch < 2.15: check it again before raising that pin). The risk of tracing is a Python branch
on data frozen into the graph (e.g. transformers skipping the attention mask of a batch without
padding): the example batch has padding, and every export is checked against PyTorch on batches
of other shapes, padded and not, when onnxruntime is installed.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mtl.errors import ModelError
from mtl.layout import (
    EMBEDDING_OUTPUT,
    MTL_FILE,
    ONNX_DIR,
    ONNX_FILE,
    ONNX_INPUTS,
    ONNX_INT8_FILE,
    ONNX_KEY,
    ONNX_RESERVED_NAMES,
)
from mtl.model import MultiTaskModel
from mtl.ort_predict import onnx_entry

__all__ = ["OPSET", "add_onnx", "export_onnx"]

#: ONNX opset of the graph (LayerNormalization is an op from 17 on; onnxruntime >= 1.14 runs it)
OPSET = 17
#: the largest absolute difference from PyTorch the export check accepts, on logits and embedding
CHECK_ATOL = 1e-3


class _Graph(nn.Module):
    """What is exported: `(logits of each task in config order..., embedding)`."""

    def __init__(self, model: MultiTaskModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, ...]:
        pooled = self.model.encoder(input_ids, attention_mask)
        logits = self.model.forward_heads(pooled)
        return (*(logits[name] for name in self.model.names), pooled)


def _batch(transformer: Any, rows: int, length: int, seed: int, pad: bool) -> tuple[Tensor, Tensor]:
    """Token ids and an attention mask: random ids above the special tokens; with `pad`, the
    rows after the first end in padding (the first row is never padded, as in a real batch)."""
    config = transformer.config
    vocab = int(config.vocab_size)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(min(1000, vocab // 2), vocab, (rows, length), generator=gen)
    mask = torch.ones(rows, length, dtype=torch.long)
    if pad:
        for row in range(1, rows):
            mask[row, max(1, length - 2 * row) :] = 0
        ids = ids.masked_fill(mask == 0, int(getattr(config, "pad_token_id", 0) or 0))
    return ids, mask


def _sequence_length(transformer: Any, wanted: int) -> int:
    limit = getattr(transformer.config, "max_position_embeddings", None)
    return max(2, min(wanted, int(limit) - 2)) if limit else wanted


def _eager_attention(transformer: Any) -> None:
    """Trace transformers' plain ("eager") attention rather than torch's fused SDPA: the same
    numbers, but a graph in the shape onnxruntime's optimiser recognises and fuses into its
    own Attention kernel, where SDPA's decomposition (an extra scaling of both Q and K, a
    boolean mask turned into a float one) stays as separate ops. Measured with the bundled
    MiniLM at batch 32 on whole reviews (2-core AMD EPYC, AVX2): int8 runs at 1.5-2.1x
    PyTorch against 1.3-1.7x for the SDPA graph. Encoders without the switch keep theirs."""
    switch = getattr(transformer, "set_attn_implementation", None)
    if switch is not None:
        with contextlib.suppress(ValueError, ImportError):
            switch("eager")


def _export_graph(graph: _Graph, path: Path, outputs: list[str]) -> None:
    transformer = graph.model.encoder.transformer
    example = _batch(transformer, 2, _sequence_length(transformer, 8), seed=0, pad=True)
    axes = {name: {0: "batch", 1: "sequence"} for name in ONNX_INPUTS}
    axes.update({name: {0: "batch"} for name in outputs})
    with warnings.catch_warnings(), torch.no_grad():
        # the DeprecationWarning of the TorchScript exporter (see the module docstring) and the
        # tracer's warnings about shape arithmetic, which the checks below cover
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            example,
            str(path),
            input_names=list(ONNX_INPUTS),
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )


def _check(graph: _Graph, path: Path, outputs: list[str]) -> None:
    """Run the graph in onnxruntime on batches of shapes other than the traced one (padded and
    not) and compare with PyTorch; skipped when onnxruntime is not installed."""
    try:
        import onnxruntime as ort
    except ImportError:
        return
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    transformer = graph.model.encoder.transformer
    for rows, length, pad in ((3, 13, True), (1, 5, False), (4, 3, False)):
        ids, mask = _batch(transformer, rows, _sequence_length(transformer, length), 1, pad)
        with torch.no_grad():
            expected = graph(ids, mask)
        got = session.run(outputs, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        for name, want, have in zip(outputs, expected, got, strict=True):
            diff = float((want - torch.from_numpy(have)).abs().max())
            if not diff <= CHECK_ATOL:
                raise ModelError(
                    f"the ONNX export differs from PyTorch: output {name!r} by {diff:.3g} on a "
                    f"batch of {rows} x {length}{' with padding' if pad else ''}"
                )


def _quantize(source: Path, target: Path) -> None:
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as exc:
        raise ModelError(
            f"int8 quantisation needs onnxruntime ({exc}): pip install 'mtl-jobs[onnx]'"
        ) from None
    # uint8 weights and activations (U8U8), one scale per output channel; activations are
    # quantised on the fly per batch. Per channel matters: on MiniLM-L6 the embeddings' cosine
    # to fp32 is 0.991 on average (0.963 at worst) against 0.944 (0.827) with one scale per
    # tensor. U8U8 rather than the usual int8 weights (U8S8): on CPUs without VNNI (AVX2 and
    # plain AVX-512, like our 2-core AMD EPYC) onnxruntime's U8S8 kernels sum pairs of products
    # in saturating int16, and the tests' model then agreed with PyTorch on 98.0% of labels
    # (99.25% with `reduce_range`, 7-bit weights) against 99.75% with U8U8, whose integer
    # arithmetic is exact on every CPU, so a model answers alike wherever it is served. The
    # price: U8U8 does not use VNNI's int8 dot products, and here it runs 10-20% slower than
    # U8S8. Only the encoder's MatMuls run on uint8: the token embedding table (Gather) and the
    # small heads (Gemm) stay fp32.
    quantize_dynamic(
        str(source),
        str(target),
        weight_type=QuantType.QUInt8,
        per_channel=True,
        op_types_to_quantize=["MatMul"],
    )


def export_onnx(model: MultiTaskModel, directory: Path, *, int8: bool = False) -> dict[str, Any]:
    """Write `<directory>/onnx/model.onnx` (and `model.int8.onnx` with `int8`) and return the
    entry for `mtl.json`'s "onnx" key. The model is copied
    to the CPU in fp32 first: the caller's model keeps its device, dtype and mode. Each file is
    written under a temporary name, then renamed."""
    directory = Path(directory)
    clash = sorted(set(ONNX_RESERVED_NAMES) & set(model.names))
    if clash:
        raise ModelError(
            f"task {clash[0]!r}: the ONNX graph uses that name for an input or the embedding; "
            "rename the task or turn onnx.export off"
        )
    outputs = [*model.names, EMBEDDING_OUTPUT]
    # eval() on the wrapper itself: the exporter restores the module's mode after tracing
    graph = _Graph(copy.deepcopy(model).to(device="cpu", dtype=torch.float32)).eval()
    _eager_attention(graph.model.encoder.transformer)
    folder = directory / ONNX_DIR
    folder.mkdir(exist_ok=True)
    target, int8_target = directory / ONNX_FILE, directory / ONNX_INT8_FILE
    tmp = folder / f".tmp-{os.getpid()}-model.onnx"
    tmp_int8 = folder / f".tmp-{os.getpid()}-model.int8.onnx"
    try:
        try:
            _export_graph(graph, tmp, outputs)
            _check(graph, tmp, outputs)
            if int8:
                _quantize(tmp, tmp_int8)
        except ModelError:
            raise
        except Exception as exc:  # the exporter's, onnxruntime's: no common base class
            raise ModelError(f"cannot export the model to ONNX: {exc}") from exc
        os.replace(tmp, target)
        if int8:
            os.replace(tmp_int8, int8_target)
    finally:
        tmp.unlink(missing_ok=True)
        tmp_int8.unlink(missing_ok=True)
    return {
        "file": ONNX_FILE,
        "int8": ONNX_INT8_FILE if int8 else None,
        "opset": OPSET,
        "inputs": list(ONNX_INPUTS),
        "outputs": outputs,
    }


def _up_to_date(model_dir: Path, meta: dict[str, Any], int8: bool) -> bool:
    entry = onnx_entry(meta)
    if entry is None or entry.get("opset") != OPSET:
        return False
    if bool(entry.get("int8")) != int8:
        return False
    files = [entry.get("file"), *([entry.get("int8")] if int8 else [])]
    return all(isinstance(f, str) and (model_dir / f).is_file() for f in files)


def _write_meta(model_dir: Path, meta: dict[str, Any]) -> None:
    tmp = model_dir / f".{MTL_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(meta, indent=1), encoding="utf-8")
    os.replace(tmp, model_dir / MTL_FILE)


def add_onnx(model_dir: Path, *, int8: bool = False, force: bool = False) -> list[Path]:
    """Add the ONNX export to an exported model folder (`mtl export MODEL_DIR --onnx`), or to
    every member of an ensemble folder; return the folders written. Idempotent: a folder whose
    export is there with the same options (and opset) is left alone unless `force`; without
    `int8` an int8 graph is removed. The new files come first, then `mtl.json`, then the removal,
    so the folder never names an ONNX file it does not have."""
    model_dir = Path(model_dir)
    try:
        meta = json.loads((model_dir / MTL_FILE).read_text(encoding="utf-8"))
        if not isinstance(meta, dict):
            raise ValueError(f"{MTL_FILE} is not an object")
    except (OSError, ValueError) as exc:
        raise ModelError(f"{model_dir}: not an exported mtl model ({exc})") from exc
    if meta.get("kind") == "ensemble":
        try:
            members = [Path(str(m["path"])) for m in meta["members"]]
        except (KeyError, TypeError) as exc:
            raise ModelError(f"{model_dir}: not an exported mtl ensemble ({exc!r})") from None
        root = model_dir.resolve()
        written: list[Path] = []
        for i, rel in enumerate(members):
            if rel.is_absolute() or root not in (model_dir / rel).resolve().parents:
                raise ModelError(f"{model_dir}: member {i} ({rel}) is outside the ensemble")
            written += add_onnx(model_dir / rel, int8=int8, force=force)
        return written
    if not force and _up_to_date(model_dir, meta, int8):
        return []
    from mtl.predict import Predictor

    predictor = Predictor.load(model_dir)
    assert isinstance(predictor, Predictor)
    meta[ONNX_KEY] = export_onnx(predictor.model, model_dir, int8=int8)
    _write_meta(model_dir, meta)
    if not int8:
        (model_dir / ONNX_INT8_FILE).unlink(missing_ok=True)
    return [model_dir]
