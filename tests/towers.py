"""A tiny tower folder built without torch: two small ONNX graphs written with ``onnx.helper``,
CLIP's byte-level BPE as ``tokenizer.json``, and the configs of Immich's layout.

It is a real model for ONNX Runtime (not a stand-in): the image tower pools the normalised
pixels to a 4x4 grid and projects them, the text tower averages token embeddings and projects
them, both with fixed random weights. Different pictures and texts get different vectors, and
the same input always the same one, which is what ingest, sync and search tests need. With it
the core's tests run where torch cannot be installed (``make test-core-py313``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

DIM = 32
SIZE = 64
CONTEXT = 16


def make_tiny_towers(folder: Path, seed: int = 0) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from clipsearch.tokenizer import clip_tokenizer_json

    from .conftest import tiny_clip_vocab

    rng = np.random.default_rng(seed)
    grid = 4
    vocab = tiny_clip_vocab()

    def save(graph: onnx.GraphProto, path: Path) -> None:
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8  # what every ONNX Runtime since 1.14 reads
        onnx.checker.check_model(model)
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(model, str(path))

    # image: (n, 3, H, W) -> average pool to (n, 3, 4, 4) -> (n, 48) -> (n, DIM)
    k = SIZE // grid
    image = helper.make_graph(
        [
            helper.make_node("AveragePool", ["image"], ["pooled"], kernel_shape=[k, k], strides=[k, k]),
            helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "w_image"], ["embeddings"]),
        ],
        "image_tower",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", DIM])],
        [numpy_helper.from_array(rng.normal(size=(3 * grid * grid, DIM)).astype(np.float32), "w_image")],
    )
    save(image, folder / "visual" / "model.onnx")

    # text: (n, CONTEXT) ids -> embeddings (n, CONTEXT, DIM) -> mean -> (n, DIM) -> (n, DIM)
    text = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "text"], ["tokens"], axis=0),
            helper.make_node("ReduceMean", ["tokens"], ["mean"], axes=[1], keepdims=0),
            helper.make_node("MatMul", ["mean", "w_text"], ["embeddings"]),
        ],
        "text_tower",
        [helper.make_tensor_value_info("text", TensorProto.INT64, ["batch", CONTEXT])],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", DIM])],
        [
            numpy_helper.from_array(rng.normal(size=(len(vocab), DIM)).astype(np.float32), "table"),
            numpy_helper.from_array(rng.normal(size=(DIM, DIM)).astype(np.float32), "w_text"),
        ],
    )
    save(text, folder / "textual" / "model.onnx")

    clip_tokenizer_json(
        folder / "textual", vocab, [], ["<|startoftext|>", "<|endoftext|>"], "<|endoftext|>", lower=True
    )
    config = {"embed_dim": DIM, "vision_cfg": {"image_size": SIZE}, "text_cfg": {"context_length": CONTEXT}}
    (folder / "config.json").write_text(json.dumps(config))
    preprocess = {
        "size": [SIZE, SIZE],
        "mode": "RGB",
        "mean": [0.48145466, 0.4578275, 0.40821073],
        "std": [0.26862954, 0.26130258, 0.27577711],
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    (folder / "visual" / "preprocess_cfg.json").write_text(json.dumps(preprocess))
    return folder
