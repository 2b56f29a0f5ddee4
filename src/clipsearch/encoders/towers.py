"""Tower folders: a model's image and text towers as ONNX files, run on ONNX Runtime without torch.

The layout is the one Immich publishes (one Hugging Face repository per model, e.g.
``immich-app/ViT-B-32__openai``), and the one ``clipsearch models export`` writes::

    config.json                    open_clip's model config (embed_dim, vision_cfg, text_cfg)
    visual/model.onnx              image tower: float32 (n, 3, H, W) -> (n, dim)
    visual/preprocess_cfg.json     open_clip's preprocessing (size, mean, std, interpolation, ...)
    textual/model.onnx             text tower: token ids (n, context) -> (n, dim)
    textual/tokenizer.json         a Hugging Face tokenizer, with tokenizer_config.json beside it
    clipsearch.json                (ours only) the model's identity, text pooling, int8 file

Only ``clipsearch.json`` is ours: a folder without it (Immich's) is read from the rest, with a
fixed or free batch and length as its graphs say, and ``input_ids`` + ``attention_mask`` for
text towers that take a mask (Immich's multilingual CLIP). ``TowerEncoder`` runs such a folder:
Pillow + numpy preprocessing, Hugging Face ``tokenizers`` behind open_clip's text cleaning
(``clipsearch.tokenizer``), and one ONNX Runtime session per tower, created on first use. So a
text query loads the text tower only and an image query the image tower only.

Exports made from a PyTorch model live in a cache folder (``cache_root()``), one folder per
weights digest; ``by-spec/KEY`` files name the folder that holds the export of the model a
namespace records (name, tag, weights path with its files' sizes and mtimes), so that a query
finds it without loading the model (``find_export``). They hold folder names, not paths: the
cache can be copied or moved (``CLIPSEARCH_ONNX_CACHE``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MissingExtraError, UsageError, option
from ..files import write_atomic
from ..identity import ModelIdentity, ModelSpec, folder_digest
from ..imaging import Preprocessor, PreprocessSpec
from .interface import FEW_IMAGES, Encoder

# bump when the exported graphs or meta change (3: text pooling and tokenizer in meta; 4: weights
# digest and decode mode in the identity, int8 for the image tower only; 5: Immich's layout)
EXPORT_VERSION = 5
META = "clipsearch.json"
_BY_SPEC = "by-spec"
# what a tower folder needs; int8 and the tokenizer's other files are optional
REQUIRED = ("config.json", "visual/model.onnx", "visual/preprocess_cfg.json", "textual/model.onnx")
# what to take of a published repository (Immich's also hold ARM NN and RKNN files)
HUB_PATTERNS = [
    "config.json",
    META,
    "visual/model.onnx",
    "visual/model*.onnx*",
    "visual/*.data",
    "visual/preprocess_cfg.json",
    "textual/model.onnx",
    "textual/model*.onnx*",
    "textual/*.data",
    "textual/*.json",
    "textual/*.txt",
    "textual/*.model",
]

Tokenize = Callable[[list[str]], np.ndarray]  # texts -> int64 (n, context) token ids


def cache_root() -> Path:
    """Where exports live: ``CLIPSEARCH_ONNX_CACHE``, else ``$XDG_CACHE_HOME/clipsearch/onnx``."""
    from ..settings import settings

    return settings().onnx_cache


def import_ort() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise MissingExtraError("ONNX Runtime", "onnxruntime") from None
    return onnxruntime


def is_tower_folder(path: Path) -> bool:
    """Whether ``path`` is a folder in the tower layout (this module's docstring)."""
    return path.is_dir() and all((path / name).is_file() for name in REQUIRED)


def tower_file(tower: str, precision: str) -> str:
    """The file a tower runs from. int8 quantises the image tower only: ONNX Runtime's dynamic
    quantisation scales activations per tensor, which costs the text tower too much (cosine
    0.988 to fp32 on a sensitive checkpoint), while a text query is cheap in fp32 anyway."""
    folder = "visual" if tower == "image" else "textual"
    return f"{folder}/model.int8.onnx" if precision == "int8" and tower == "image" else f"{folder}/model.onnx"


# -- finding exports ---------------------------------------------------------------------------
def _weights_state(path: Path) -> list[tuple[str, int, int]]:
    """(name, size, mtime) of a weights file, or of each file in a weights folder."""
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    return [(p.name, (st := p.stat()).st_size, st.st_mtime_ns) for p in files]


def export_key(spec: ModelSpec) -> str | None:
    """The key an export of ``spec``'s model is listed under, computed without loading the
    model; None for models this path does not serve (tower folders need no export, transformers
    backends have none) or weights that are gone. A changed weights file (size or mtime) gives
    another key."""
    if spec.backend != "open_clip":
        return None
    parts: dict[str, Any] = {"model": spec.model, "pretrained": spec.pretrained or "", "export": EXPORT_VERSION}
    if spec.weights is not None:
        try:
            weights = Path(spec.weights).expanduser().resolve(strict=True)
            parts["weights"] = str(weights)
            parts["files"] = _weights_state(weights)
        except OSError:
            return None
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def register_export(spec: ModelSpec, folder: Path) -> None:
    """List ``folder`` (a folder of the cache) as the export of ``spec``'s model."""
    key = export_key(spec)
    if key is not None:
        write_atomic(cache_root() / _BY_SPEC / key, folder.name, mode=0o644)


def find_export(spec: ModelSpec, precision: str = "fp32") -> Path | None:
    """The export folder of ``spec``'s model if one was made and can run without torch: both
    towers in ``precision`` and a tokenizer. None otherwise."""
    key = export_key(spec)
    if key is None:
        return None
    root = cache_root()
    try:
        name = (root / _BY_SPEC / key).read_text().strip()
    except OSError:
        return None
    folder = root / Path(name).name  # a bare name; older caches held a path, whose name is the folder
    return folder if runs_without_torch(folder, precision) else None


def runs_without_torch(folder: Path, precision: str = "fp32") -> bool:
    """Whether a tower folder has all it needs to run without torch in ``precision``."""
    needed = (*REQUIRED, "textual/tokenizer.json", tower_file("image", precision))
    return all((folder / name).is_file() for name in needed)


def list_exports() -> list[tuple[Path, dict[str, Any]]]:
    """The exports in the cache with their ``clipsearch.json``, newest first."""
    root = cache_root()
    if not root.is_dir():
        return []
    found = []
    for folder in root.iterdir():
        meta = folder / META
        if folder.name != _BY_SPEC and is_tower_folder(folder) and meta.is_file():
            found.append((folder, json.loads(meta.read_text())))
    return sorted(found, key=lambda f: f[0].stat().st_mtime, reverse=True)


def hub_folder(repo_id: str) -> Path:
    """A published tower repository from the Hugging Face cache (downloaded once if it can be)."""
    from .hub import snapshot_or_fetch

    return snapshot_or_fetch(repo_id, HUB_PATTERNS, "visual/preprocess_cfg.json", f"the ONNX model {repo_id}")


def spec_folder(spec: ModelSpec) -> Path:
    """The tower folder a ``backend == "onnx"`` spec names: its ``--weights`` folder, else its
    repository in the hub cache."""
    if spec.weights is not None:
        folder = Path(spec.weights).expanduser()
        if not is_tower_folder(folder):
            missing = [name for name in REQUIRED if not (folder / name).is_file()]
            raise UsageError(
                f"{folder} is not an ONNX model folder: {', '.join(missing)} missing (see `clipsearch models export`)",
                param="weights",
            )
        return folder
    folder = hub_folder(spec.model)
    if not is_tower_folder(folder):
        raise UsageError(
            f"the repository {spec.model} is not an ONNX model in Immich's layout "
            f"(it needs {', '.join(REQUIRED)}); name an open_clip model, or hf:REPO for transformers",
            param="model",
        )
    return folder


def move_model(src: Path, dst: Path) -> None:
    """Move a model and its external data; the model last, since its presence means ready."""
    for data in src.parent.glob(src.name + "*.data"):
        os.replace(data, dst.parent / data.name)
    os.replace(src, dst)


def quantize(folder: Path) -> None:
    """Add the int8 image tower to a tower folder (ONNX Runtime's dynamic quantisation of the
    weights; it reads the graph with the ``onnx`` package, which the ``torch`` extra brings)."""
    import importlib.util

    if importlib.util.find_spec("onnx") is None:
        raise MissingExtraError("quantising a model to int8 (the onnx package)", "torch")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = folder / tower_file("image", "fp32"), folder / tower_file("image", "int8")
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp, _quiet_quantizer():
        out = Path(tmp) / dst.name
        quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8, use_external_data_format=True)
        move_model(out, dst)


class _FromQuantizer(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "onnxruntime/quantization" not in record.pathname.replace("\\", "/")


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """ONNX Runtime's quantiser logs advice ("consider to run pre-processing before
    quantization") on the root logger, which then lands in the middle of a command's output
    (``eval --compare``, ``models export``); its records are dropped while it runs, others kept."""
    root = logging.getLogger()
    quiet = _FromQuantizer()
    root.addFilter(quiet)
    for handler in root.handlers:
        handler.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)
        for handler in root.handlers:
            handler.removeFilter(quiet)


# -- running a folder --------------------------------------------------------------------------
def _normalize(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32, copy=False)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def folder_identity(folder: Path, name: str) -> ModelIdentity:
    """The identity of a tower folder: the one its ``clipsearch.json`` records (an export of a
    PyTorch model is that model), else its name and a digest of its files (a published folder is
    the same model wherever its files are)."""
    meta = folder / META
    if meta.is_file():
        return ModelIdentity.from_dict(_read(meta)["identity"])
    config = _read(folder / "config.json")
    preprocess = PreprocessSpec.from_dict(_read(folder / "visual/preprocess_cfg.json"))
    return ModelIdentity(
        backend="onnx",
        model=name,
        pretrained="",
        dim=int(config["embed_dim"]),
        preprocess=preprocess.to_dict(),
        runtime="onnx",
        weights=folder_digest(folder, _tower_files(folder)),
    )


def _tower_files(folder: Path) -> list[str]:
    """The files of a tower folder that decide its vectors."""
    names = ["config.json", "visual/preprocess_cfg.json"]
    for sub in ("visual", "textual"):
        names += sorted(
            f"{sub}/{p.name}"
            for p in (folder / sub).iterdir()
            if p.is_file() and (p.name.startswith("model.onnx") or p.suffix in (".data", ".json", ".txt", ".model"))
        )
    return sorted(set(names))


def default_clean(config: dict[str, Any]) -> str:
    """open_clip's cleaning for a model config: its ``tokenizer_kwargs``, else ``lower`` for its
    CLIP tokenizer and ``whitespace`` for Hugging Face tokenizers (open_clip's defaults)."""
    text = config.get("text_cfg", {})
    clean = text.get("tokenizer_kwargs", {}).get("clean")
    if clean:
        return str(clean)
    return "whitespace" if text.get("hf_tokenizer_name") else "lower"


class TowerEncoder(Encoder):
    """A tower folder on ONNX Runtime (CPU). Each tower's session is made when first used.

    ``name``: how to record a folder without ``clipsearch.json`` (its repository, or folder
    name). ``tokenize``: the model's own tokenizer as a function returning numpy ids, for an
    export whose tokenizer could not be written as ``tokenizer.json``. ``few_calls``: the encoder
    answers a query or two and exits (a command), so the weights are not repacked for faster
    matrix products: repacking takes longer than the few calls it would speed up. Images are
    decoded ``fast`` unless ``encoders.decoded_as`` says otherwise (``load_encoder`` does).
    """

    def __init__(
        self,
        folder: Path,
        precision: str = "fp32",
        *,
        name: str | None = None,
        spin: bool = True,
        threads: int | None = None,
        tokenize: Tokenize | None = None,
        few_calls: bool = False,
    ):
        self.folder = folder
        config = _read(folder / "config.json")
        meta = _read(folder / META) if (folder / META).is_file() else {}
        base = folder_identity(folder, name or folder.name)
        if precision == "int8" and not (folder / tower_file("image", "int8")).is_file():
            raise UsageError(
                f"{folder} has no int8 image tower ({tower_file('image', 'int8')}); run "
                f"`clipsearch models export` with the torch extra, or use {option('precision')} fp32",
                param="precision",
            )
        quantization = "int8-dynamic" if precision == "int8" else "none"
        self.identity = dataclasses.replace(
            base, runtime="onnx", precision=precision, quantization=quantization, decode="fast"
        )
        self.preprocess = Preprocessor(PreprocessSpec.from_dict(base.preprocess))
        text = meta.get("text", {})
        self._context = int(config.get("text_cfg", {}).get("context_length", 77))
        self._clean = str(text.get("clean") or default_clean(config))
        self._strip_sep = bool(config.get("text_cfg", {}).get("tokenizer_kwargs", {}).get("strip_sep_token", False))
        self._trim = bool(text.get("trim", False))
        self._pool = text.get("pool")
        self._eos_id = text.get("eos_id")
        self._pad_id: int | None = text.get("pad_id")
        self._image_tokens = int(meta.get("image_tokens", 0))
        self._precision = precision
        self._spin = spin
        self._threads = threads
        self._tokenize = tokenize
        self._few_calls = few_calls
        self._few_images = False  # prepare_images was told of a few images: the image session skips prepacking
        self._sessions: dict[str, Any] = {}
        self._opening: dict[str, Any] = {}  # tower -> Future of its session, while it opens
        self.device = "cpu"

    # -- sessions ------------------------------------------------------------------------
    def _session(self, tower: str) -> Any:
        session = self._sessions.get(tower)
        if session is None:
            opening = self._opening.pop(tower, None)
            session = opening.result() if opening is not None else self._open(tower)
            self._sessions[tower] = session
        return session

    def _open_soon(self, tower: str) -> None:
        """Start opening ``tower``'s session on another thread: importing ONNX Runtime and
        mapping the weights (C++, without the GIL) then overlap the tokenizer's loading, which a
        cold text query also waits for."""
        if tower in self._sessions or tower in self._opening:
            return
        import threading
        from concurrent.futures import Future

        future: Future[Any] = Future()

        def open_it() -> None:
            try:
                future.set_result(self._open(tower))
            except BaseException as e:  # given to the caller of _session, as a direct open would
                future.set_exception(e)

        self._opening[tower] = future
        # not a daemon: a process that ends while the session is still opening (an ingest that
        # found only metadata to update, an error, Ctrl-C) waits for it, since ONNX Runtime
        # aborts the process ("terminate called without an active exception") when the
        # interpreter is torn down under a session being built
        threading.Thread(target=open_it, name=f"clipsearch-open-{tower}", daemon=False).start()

    def _open(self, tower: str) -> Any:
        ort = import_ort()
        options = ort.SessionOptions()
        options.intra_op_num_threads = self._threads or os.cpu_count() or 1
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if not self._spin:
            # Idle worker threads spin by default: best for batch ingest, but in a server they
            # burn the cores the event loop needs between batches.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if self._few_calls or (tower == "image" and self._few_images):
            # Prepacking lays the weights out for the CPU's matrix kernels as the session opens:
            # 0.45 s instead of 0.08 s for ViT-B-32's image tower, each image then ~20% faster,
            # which a query, or an ingest of a few photos, never wins back
            options.add_session_config_entry("session.disable_prepacking", "1")
        path = str(self.folder / tower_file(tower, self._precision))
        return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    @property
    def tokenize_needs_model(self) -> bool:
        """Whether texts are tokenised by the PyTorch model's own tokenizer (an export whose
        tokenizer has no ``tokenizer.json``): then queries still need torch."""
        return not (self.folder / "textual" / "tokenizer.json").is_file()

    def loaded_towers(self) -> list[str]:
        """The towers whose sessions exist (a text query loads only ``text``)."""
        return sorted(self._sessions)

    def _run(self, tower: str, feed: dict[str, np.ndarray]) -> np.ndarray:
        """Run a tower, one row at a time where its graph has a fixed batch of one (Immich's)."""
        session = self._session(tower)
        inputs = session.get_inputs()
        typed = {i.name: feed[i.name].astype(_NUMPY_TYPES.get(i.type, np.float32), copy=False) for i in inputs}
        n = len(next(iter(typed.values())))
        if inputs[0].shape and inputs[0].shape[0] == 1 and n > 1:
            rows = [session.run(None, {k: v[i : i + 1] for k, v in typed.items()})[0] for i in range(n)]
            return np.concatenate(rows)
        return session.run(None, typed)[0]

    # -- text ----------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> np.ndarray:
        from ..tokenizer import bounded_text

        texts = [bounded_text(t, self._context) for t in texts]
        if self._tokenize is None:
            from ..tokenizer import TextTokenizer

            tokenizer = TextTokenizer(self.folder / "textual", self._context, self._clean, strip_sep=self._strip_sep)
            if self._pad_id is None:
                self._pad_id = tokenizer.pad_id
            self._tokenize = tokenizer
        return np.asarray(self._tokenize(texts), dtype=np.int64)

    @property
    def pad_id(self) -> int:
        return int(self._pad_id or 0)

    def _trimmed(self, tokens: np.ndarray) -> np.ndarray:
        """Tokens cut after the longest real sequence (an exported graph that takes any length)."""
        if not self._trim:
            return tokens
        ends = tokens.argmax(axis=1) if self._pool == "argmax" else (tokens == self._eos_id).argmax(axis=1)
        return np.ascontiguousarray(tokens[:, : int(ends.max()) + 1])

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self.embed_texts_counted(texts)[0]

    def embed_texts_counted(self, texts: Sequence[str]) -> tuple[np.ndarray, list[int]]:
        texts = [str(t) for t in texts]
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32), []
        self._open_soon("text")
        tokens = self.tokenize(texts)
        counts = (tokens != self.pad_id).sum(axis=1).tolist()
        session = self._session("text")
        names = [i.name for i in session.get_inputs()]
        if "attention_mask" in names:  # a text tower that takes its mask (Immich's M-CLIP)
            feed = {names[0]: tokens, "attention_mask": (tokens != self.pad_id).astype(np.int64)}
        else:
            feed = {names[0]: self._trimmed(tokens)}
        return _normalize(self._run("text", feed)), counts

    def count_tokens(self, texts: list[str]) -> list[int]:
        return (self.tokenize([str(t) for t in texts]) != self.pad_id).sum(axis=1).tolist()

    # -- images --------------------------------------------------------------------------
    @property
    def image_tokens(self) -> int:
        return self._image_tokens

    def prepare_texts(self) -> None:
        self._open_soon("text")

    def prepare_images(self, expected: int | None = None) -> None:
        """Open the image tower's session on another thread, overlapping the reading and
        decoding of the first batch; for at most ``FEW_IMAGES`` images without prepacking (the
        0.37 s it saves for ViT-B-32 on 2 cores pays for ~20 images at ~18 ms more each)."""
        if "image" in self._sessions or "image" in self._opening:
            return
        self._few_images = expected is not None and expected <= FEW_IMAGES
        self._open_soon("image")

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        if len(pixels) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        feed = np.ascontiguousarray(pixels, dtype=np.float32)
        name = self._session("image").get_inputs()[0].name
        if self._precision == "int8":
            # Dynamic quantisation scales each activation tensor by its largest value, over the
            # whole batch: an image's vector would depend on what it was batched with (the
            # server's batches, an ingest's). One image per run keeps each vector its own, at the
            # same speed on the CPU (measured: 38 images/s either way for ViT-B-32).
            out = np.concatenate([self._run("image", {name: feed[i : i + 1]}) for i in range(len(feed))])
        else:
            out = self._run("image", {name: feed})
        return _normalize(out)


_NUMPY_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


def load(spec: ModelSpec, *, spin: bool = True, few_calls: bool = False) -> TowerEncoder:
    """The encoder of a ``backend == "onnx"`` spec (a tower folder or published repository)."""
    folder = spec_folder(spec)
    name = spec.model if spec.weights is None else Path(spec.weights).name
    return TowerEncoder(folder, spec.precision, name=name, spin=spin, few_calls=few_calls)
