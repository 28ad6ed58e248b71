"""File names of the exported model folder that torch-free code needs too (`mtl.ort_predict`,
`mtl.ensemble`): this module imports nothing. The folder itself is described in `mtl.export`."""

from __future__ import annotations

__all__ = [
    "EMBEDDING_OUTPUT",
    "MTL_FILE",
    "ONNX_DIR",
    "ONNX_FILE",
    "ONNX_INPUTS",
    "ONNX_INT8_FILE",
    "ONNX_KEY",
    "ONNX_RESERVED_NAMES",
]

#: the model's metadata (tasks, labels, pooling, ...), at the folder's root
MTL_FILE = "mtl.json"
#: the key of `mtl.json` that describes the ONNX export (absent: there is none)
ONNX_KEY = "onnx"
ONNX_DIR = "onnx"
#: the fp32 graph and its dynamically quantised twin, relative to the model folder
ONNX_FILE = f"{ONNX_DIR}/model.onnx"
ONNX_INT8_FILE = f"{ONNX_DIR}/model.int8.onnx"
#: the graph's inputs (int64 `[batch, sequence]`) and the name of its sentence-embedding output;
#: every other output is a task's logits, named by the task
ONNX_INPUTS = ("input_ids", "attention_mask")
EMBEDDING_OUTPUT = "embedding"
#: what no task may be named in an ONNX export (a task's logits are the output named after it)
ONNX_RESERVED_NAMES = (*ONNX_INPUTS, EMBEDDING_OUTPUT)
