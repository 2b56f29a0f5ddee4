"""Shared fixtures: tiny random-init checkpoints saved to disk (loaded back through the real
loading code), generated images, and a CLI runner."""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# No test may reach the network: an unroutable hub endpoint makes the download path fail fast.
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Queries export ONNX towers on first use, and model loads keep their oneDNN verdicts: the
# suite's caches live and die with the run (450 runs had left ~25 GB). A process this one starts
# that imports the tests again (a Ray worker unpickling a test's function) inherits them: it is
# killed, not ended, so caches of its own outlived it.
if os.environ.get("CLIPSEARCH_TEST_CACHES_OF") is None:
    os.environ["CLIPSEARCH_TEST_CACHES_OF"] = str(os.getpid())
    for _name, _kind in (("CLIPSEARCH_ONNX_CACHE", "onnx"), ("XDG_CACHE_HOME", "cache")):
        os.environ[_name] = tempfile.mkdtemp(prefix=f"clipsearch-test-{_kind}-")
        atexit.register(shutil.rmtree, os.environ[_name], ignore_errors=True)

TINY_OPENCLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {
        "image_size": 224,
        "layers": 2,
        "width": 64,
        "patch_size": 32,
        "head_width": 32,
        "no_ln_pre": True,
    },
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def make_tiny_openclip(folder: Path, seed: int = 0, embed_dim: int | None = None) -> Path:
    """An open_clip model folder in the hub layout (open_clip_config.json + safetensors).

    Random init makes every image look alike to a ViT (the class token dominates); no ln_pre and
    a small class/position embedding make the vectors depend on the picture, so tests that
    compare embeddings can fail.
    """
    import torch

    from clipsearch._compat import import_open_clip

    import_open_clip()
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    cfg = TINY_OPENCLIP_CFG if embed_dim is None else {**TINY_OPENCLIP_CFG, "embed_dim": embed_dim}
    model = CLIP(**cfg)
    with torch.no_grad():
        model.visual.conv1.weight.normal_(0, 0.05)
        model.visual.positional_embedding.mul_(0.1)
        model.visual.class_embedding.mul_(0.1)
        model.token_embedding.weight.normal_(0, 1.0)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    save_file(model.state_dict(), str(folder / "open_clip_model.safetensors"))
    return folder


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def tiny_clip_vocab() -> dict[str, int]:
    """A byte-level CLIP vocabulary without merges: each byte's character, alone and ending a
    word (``</w>``), then start and end of text (514 tokens)."""
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = 512
    vocab["<|endoftext|>"] = 513
    return vocab


def make_tiny_hf_clip(folder: Path, seed: int = 0) -> Path:
    """A transformers CLIP folder written with save_pretrained: byte-level tokenizer, 2 layers."""
    from clipsearch._compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = tiny_clip_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    config = CLIPConfig(
        text_config={
            "vocab_size": 514,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "bos_token_id": 512,
            "eos_token_id": 513,
            "pad_token_id": 513,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 64,
            "patch_size": 16,
        },
        projection_dim=24,
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "CLIPImageProcessor",
                "size": {"shortest_edge": 64},
                "crop_size": {"height": 64, "width": 64},
                "do_center_crop": True,
                "resample": 3,
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
            }
        )
    )
    return folder


@pytest.fixture(scope="session")
def tiny_openclip(tmp_path_factory) -> Path:
    return make_tiny_openclip(tmp_path_factory.mktemp("models") / "tiny-openclip")


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory) -> Path:
    return make_tiny_hf_clip(tmp_path_factory.mktemp("models") / "tiny-hf-clip")


@pytest.fixture(scope="session")
def trained_clip() -> Path:
    """The tiny CLIP the suite trains (tests/trained.py), cached between runs."""
    from .trained import trained_model

    return trained_model()


@pytest.fixture(scope="session")
def encoder(tiny_openclip):
    from clipsearch.encoders import ModelSpec, load_encoder

    return load_encoder(ModelSpec(weights=tiny_openclip, device="cpu"))


SAMPLE_PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "colorwheel", "immunohistochemistry"]


def sample_photo(name: str) -> Image.Image:
    import skimage.data

    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")


def write_photos(folder: Path, names: list[str] | None = None, fmt: str = "JPEG") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names or SAMPLE_PHOTOS:
        ext = {"JPEG": "jpg", "PNG": "png"}[fmt]
        path = folder / f"{name}.{ext}"
        sample_photo(name).save(path, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        paths.append(path)
    return paths


def noise_images(folder: Path, n: int, size: tuple[int, int] = (320, 240), seed: int = 0) -> list[Path]:
    """Distinct random-texture PNGs (smooth blobs, so that each looks different to the model)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)
        path = folder / f"img_{i:04d}.png"
        img.save(path)
        paths.append(path)
    return paths


@functools.lru_cache(maxsize=4096)
def noise_png(n: int, size: tuple[int, int] = (96, 72)) -> bytes:
    """The n-th of many distinct small images (smooth colour blobs), as PNG bytes."""
    import io

    rng = np.random.default_rng(1000 + n)
    small = rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small).resize(size, Image.Resampling.BICUBIC).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def photos(tmp_path) -> Path:
    folder = tmp_path / "photos"
    write_photos(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(request, tmp_path_factory) -> Path:
    """The model commands get when a test names none: the tiny open_clip checkpoint, or, where
    torch is not installed (the core's venv, ``make test-core-py313``), the tiny tower folder
    of ``tests/towers.py``."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        from .towers import make_tiny_towers

        return make_tiny_towers(tmp_path_factory.mktemp("models") / "tiny-towers")
    return request.getfixturevalue("tiny_openclip")


@pytest.fixture
def cli(tiny_model, tmp_path):
    """Run the real Typer app in-process; returns (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from clipsearch.cli import app

    runner = CliRunner()
    db = tmp_path / "test.db"

    def run(*args: str, weights: bool = True, env: dict | None = None, input: bytes | str | None = None):
        argv = [str(a) for a in args]
        if "--db" not in argv and argv and argv[0] not in ("--version", "models"):
            argv += ["--db", str(db)]
        if weights and argv and argv[0] in ("ingest",) and "--weights" not in argv:
            argv += ["--weights", str(tiny_model)]
        result = runner.invoke(app, argv, env=env, input=input, catch_exceptions=False)
        return result.exit_code, result.stdout, result.stderr

    run.db = db  # type: ignore[attr-defined]
    return run


# -- processes without torch -------------------------------------------------------------------
# FAISS too: the core install has none, and its exact index must never ask for it
BLOCKED = ("torch", "open_clip", "transformers", "torchvision", "faiss")

# Installed as sitecustomize in the child processes: an import of a blocked package fails, and
# is written to a file, so a test can assert that none was even tried.
BLOCKER = """
import importlib.abc, os, sys

BLOCKED = {blocked!r}


class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] not in BLOCKED:
            return None
        # importlib.util.find_spec only asks whether it is installed: not an import
        asking = sys._getframe(1).f_code.co_name == "_find_spec" and sys._getframe(2).f_code.co_name == "find_spec"
        if not asking:
            with open(os.environ["BLOCK_LOG"], "a") as f:
                f.write(name + "\\n")
        raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)


sys.meta_path.insert(0, _Block())
"""


@pytest.fixture(scope="session")
def blocker(tmp_path_factory) -> Path:
    """A folder for PYTHONPATH whose sitecustomize blocks torch & co (set BLOCK_LOG too)."""
    folder = tmp_path_factory.mktemp("blocker")
    (folder / "sitecustomize.py").write_text(BLOCKER.format(blocked=BLOCKED))
    return folder


def seed_hub_cache(hub_cache: Path, repo: str, folder: Path, revision: str = "0" * 40) -> Path:
    """Put ``folder`` into a Hugging Face hub cache as the snapshot of ``repo``, laid out as
    huggingface_hub downloads one (blobs named by content, snapshot links, ``refs/main``), so that
    ``--model OWNER/NAME`` finds it offline. Returns the snapshot folder."""
    import hashlib
    import shutil

    root = hub_cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / revision
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        blob = root / "blobs" / digest
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            shutil.copyfile(path, blob)
        link = snapshot / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(revision)
    return snapshot


def hub_with_towers(weights: Path, repo: str, work: Path) -> Path:
    """An HF_HOME under ``work`` whose hub cache holds ``weights`` exported to towers as the
    snapshot of ``repo``, so that ``--model OWNER/NAME`` runs them offline and torch-free."""
    import clipsearch
    from clipsearch import models

    models.export(clipsearch.ModelSpec(weights=weights), work / "towers", int8=False)
    seed_hub_cache(work / "hf" / "hub", repo, work / "towers")
    return work / "hf"


# -- servers on 127.0.0.1 -------------------------------------------------------------------
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base: str, timeout: float) -> None:
    """Until the server process at ``base`` says it is healthy, or ``timeout`` seconds pass (the
    caller's next request then shows why): it refuses connections until it listens."""
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/health").json().get("status") == "healthy":
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)


class RunningServer:
    """A real uvicorn server in a background thread; ``url`` is its base address."""

    def __init__(self, app, port: int | None = None):
        import threading

        import uvicorn

        self.app = app
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> RunningServer:
        import time

        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.01)
        return self

    def wait_ready(self, timeout: float = 60) -> RunningServer:
        import time

        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if httpx.get(self.url + "/health").status_code == 200:
                return self
            time.sleep(0.02)
        raise RuntimeError("model did not load")

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


class ImageHandlerServer:
    """A small HTTP server for fetch tests: real images, errors, slow and oversized answers.

    Routes: /img/NAME.jpg (a sample photo), /noise/N.png (the N-th of many distinct small
    images; ?s=SECONDS first waits), /status/CODE, /flaky/KEY (500 twice, then the image), /slow?s=SECONDS (default 5),
    /html, /big (5 MB of JPEG-looking bytes), /cut (a body cut short), /redirect-loop,
    /redirect-to/PATH.
    ``hits`` counts requests per path.
    """

    def __init__(self):
        import io
        import threading
        from collections import Counter
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.hits: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.in_flight = 0  # /slow requests being answered now, and the most at once
        self.most_in_flight = 0
        images: dict[str, bytes] = {}
        for name in SAMPLE_PHOTOS:
            buf = io.BytesIO()
            sample_photo(name).save(buf, "JPEG", quality=90)
            images[name] = buf.getvalue()
        self.images = images
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _send(self, code: int, body: bytes, ctype: str = "image/jpeg", headers: dict | None = None) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(body)

            def do_GET(self) -> None:
                import time

                path, _, query = self.path.partition("?")
                with owner.lock:
                    owner.hits[path] += 1
                parts = path.strip("/").split("/")
                if parts[0] == "img" and len(parts) == 2 and parts[1].removesuffix(".jpg") in images:
                    self._send(200, images[parts[1].removesuffix(".jpg")])
                elif parts[0] == "noise" and len(parts) == 2 and parts[1].removesuffix(".png").isdigit():
                    if query.startswith("s="):  # a delay, for tests that must catch a run midway
                        time.sleep(float(query.removeprefix("s=")))
                    self._send(200, noise_png(int(parts[1].removesuffix(".png"))), "image/png")
                elif parts[0] == "status" and len(parts) == 2:
                    self._send(int(parts[1]), b"error", "text/plain")
                elif parts[0] == "flaky":
                    if owner.hits[path] <= 2:
                        self._send(500, b"try again", "text/plain")
                    else:
                        self._send(200, images["coffee"])
                elif path == "/slow":
                    with owner.lock:
                        owner.in_flight += 1
                        owner.most_in_flight = max(owner.most_in_flight, owner.in_flight)
                    try:
                        time.sleep(float(query.split("&")[0].removeprefix("s=") or 5))
                    finally:
                        with owner.lock:
                            owner.in_flight -= 1
                    self._send(200, images["coffee"])
                elif path == "/cut":  # promises 1000 bytes, sends 10, closes the connection
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    self.send_header("Content-Length", "1000")
                    self.end_headers()
                    self.wfile.write(b"\xff\xd8\xff" + b"\0" * 7)
                    self.wfile.flush()
                    self.close_connection = True
                elif path == "/html":
                    self._send(200, b"<html><body>not an image</body></html>", "text/html")
                elif path == "/big":
                    self._send(200, b"\xff\xd8\xff" + b"\0" * (5 * 1024 * 1024))
                elif path == "/redirect-loop":
                    self._send(302, b"", "text/plain", {"Location": "/redirect-loop"})
                elif parts[0] == "gzip-bomb":  # /gzip-bomb/LAYERS/MIB: MIB MiB of zeros, gzipped LAYERS times
                    layers, mib = int(parts[1]), int(parts[2])
                    encoding = ", ".join(["gzip"] * layers)
                    self._send(200, gzip_bomb(layers, mib), "image/jpeg", {"Content-Encoding": encoding})
                elif parts[0] == "gzipped" and len(parts) == 2:  # a real image, sent gzip-encoded
                    import gzip

                    body = gzip.compress(images[parts[1].removesuffix(".jpg")])
                    self._send(200, body, "image/jpeg", {"Content-Encoding": "gzip"})
                elif parts[0] == "redirect-to":
                    self._send(302, b"", "text/plain", {"Location": "/" + "/".join(parts[1:])})
                else:
                    self._send(404, b"not found", "text/plain")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@functools.cache
def gzip_bomb(layers: int, mib: int) -> bytes:
    """``mib`` MiB of zeros gzipped ``layers`` times, compressed a MiB at a time (a few KB)."""
    import gzip
    import io
    import zlib

    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb") as z:
        zero = bytes(1 << 20)
        for _ in range(mib):
            z.write(zero)
    data = out.getvalue()
    for _ in range(layers - 1):
        data = gzip.compress(data, compresslevel=zlib.Z_BEST_COMPRESSION)
    return data


@pytest.fixture(scope="session")
def image_server():
    server = ImageHandlerServer()
    yield server
    server.close()


# -- PostgreSQL with pgvector ------------------------------------------------------------------
class SystemPostgres:
    """A throw-away cluster of the machine's PostgreSQL (``pg_config`` on PATH or Debian's
    /usr/lib/postgresql/<n>/bin): initdb into a temp folder, a free port on 127.0.0.1, trust
    authentication. PostgreSQL refuses to run as root, so a root test run starts it as the
    ``postgres`` user (which Debian's package creates)."""

    def __init__(self, bindir: Path):
        import pwd
        import socket
        import subprocess

        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="clipsearch-pg-"))
        self.data = self.root / "data"
        self._as: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        run = functools.partial(subprocess.run, check=True, capture_output=True)
        run([*self._as, str(bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
             "-E", "UTF8", "--locale=C"])  # fmt: skip
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        run([*self._as, str(bindir / "pg_ctl"), "-D", str(self.data), "-o", opts, "-l", str(self.root / "log"),
             "-w", "start"])  # fmt: skip

    def get_uri(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres?sslmode=disable"

    def cleanup(self) -> None:
        import subprocess

        subprocess.run([*self._as, str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"],
                       capture_output=True)  # fmt: skip
        shutil.rmtree(self.root, ignore_errors=True)


def system_postgres_bindir() -> Path | None:
    """The bin folder of a PostgreSQL on this machine whose share folder has pgvector."""
    import subprocess

    candidates = []
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir", "--sharedir"], capture_output=True, text=True).stdout.split()
        if len(out) == 2:
            candidates.append((Path(out[0]), Path(out[1])))
    for bindir in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        candidates.append((bindir, Path("/usr/share/postgresql") / bindir.parent.name))
    for bindir, share in candidates:
        if (bindir / "initdb").exists() and (share / "extension" / "vector.control").exists():
            return bindir
    return None


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory):
    """A real PostgreSQL server with the vector extension, started once for the session.
    ``CLIPSEARCH_TEST_POSTGRES``: ``system`` (the machine's PostgreSQL and pgvector, as
    scripts/pgvector.sh installs them; CI asks for it, so a missing install fails rather than
    falls back), ``pgserver`` (the pgserver wheel: PostgreSQL 16, pgvector 0.6), or unset: the
    system one when there is one."""
    wanted = os.environ.get("CLIPSEARCH_TEST_POSTGRES", "")
    bindir = system_postgres_bindir() if wanted in ("", "system") else None
    if wanted == "system" and bindir is None:
        pytest.fail("CLIPSEARCH_TEST_POSTGRES=system, but no PostgreSQL with pgvector here: run scripts/pgvector.sh")
    if bindir is not None:
        server = SystemPostgres(bindir)
    else:
        import pgserver

        server = pgserver.get_server(tmp_path_factory.mktemp("pgdata"), cleanup_mode="stop")
    yield server
    server.cleanup()


@pytest.fixture
def pg_url(pg_server) -> str:
    """A fresh, empty database on the session's server."""
    import uuid

    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    base = pg_server.get_uri()
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return base.replace("/postgres?", f"/{name}?", 1)


# -- killing an ingest mid-run -----------------------------------------------------------------
def stored_vectors(db) -> dict[str, np.ndarray]:
    """Item id -> vector of a store's default namespace (a SQLite file or a PostgreSQL URL)."""
    from clipsearch.store import open_store

    store = open_store(str(db))
    try:
        return {it.id: v for items, vecs in store.iter_vectors("default") for it, v in zip(items, vecs, strict=True)}
    finally:
        store.close()


def stored_items(db: Path) -> int:
    """Rows in a SQLite store's items table (0 while the file is being created)."""
    import sqlite3

    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db) as conn:
            return conn.execute("SELECT count(*) FROM items").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def interrupt_mid_run(cmd: list[str], db: Path, sig: int, at: int = 12) -> int:
    """Start ``cmd`` (an ingest into the SQLite file ``db``), send it ``sig`` once ``at`` items
    are stored, check that it died of it (or exited 130 for Ctrl-C); the items it left."""
    import signal
    import subprocess
    import time

    # Ctrl-C must reach the child as a person's would: a test run started in the background of
    # a non-interactive shell has SIGINT ignored, a child inherits that, and Python then installs
    # no KeyboardInterrupt handler (the run would finish, exit 0)
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and stored_items(db) < at:
        time.sleep(0.02)
    os.kill(proc.pid, sig)
    returncode = proc.wait(timeout=60)
    assert returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 130), proc.stderr.read()
    return stored_items(db)


# -- tiers and markers -------------------------------------------------------------------------
# tests/unit: the fake model, SQLite, pure functions (``make test-fast``, under a minute);
# tests/e2e: real models, servers, PostgreSQL, Ray, Chromium. Markers say what a test needs, so
# that ``-m "not postgres"`` and the like select by it; they are set here, from the fixtures a
# test asks for, so that no test can forget its own.
_NEEDS = {
    "pg_url": "postgres",
    "pg_server": "postgres",
    "ray_cluster": "ray",
    "browser": "browser",
    "tiny_openclip": "model",
    "tiny_hf": "model",
    "tiny_model": "model",
    "trained_clip": "model",
    "encoder": "model",
    "cli": "model",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        tier = "unit" if "tests/unit/" in item.nodeid or item.nodeid.startswith("unit/") else "e2e"
        item.add_marker(getattr(pytest.mark, tier))
        for fixture in set(getattr(item, "fixturenames", ())) & _NEEDS.keys():
            item.add_marker(getattr(pytest.mark, _NEEDS[fixture]))
