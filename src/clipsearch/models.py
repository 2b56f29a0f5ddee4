"""Model folders you can move: exporting a model's towers to ONNX, and listing what is cached.

``export(choice, out)`` writes a model as a tower folder (``encoders.towers``: Immich's layout,
plus our ``clipsearch.json``), fp32 and the int8 image tower: an open_clip or transformers
checkpoint through its PyTorch model (the ``torch`` extra; ``hf`` for transformers), a published
tower repository or folder by copying it. The
folder runs anywhere with ``--weights DIR``, without torch, and records the identity of the model
it came from, so a namespace made with the PyTorch model is searched with it unchanged.
``cached()`` lists the exports in the ONNX cache and the tower repositories in the Hugging Face
cache.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError
from .identity import ModelIdentity, ModelSpec


@dataclass
class ModelFolder:
    """A tower folder: where it is, the identity of its vectors, what it holds."""

    folder: Path
    identity: ModelIdentity
    int8: bool
    size_bytes: int
    source: str  # "export" (our cache) or "hub" (a published repository)

    def as_dict(self) -> dict[str, object]:
        return {
            "folder": str(self.folder),
            "model": self.identity.model_id,
            "backend": self.identity.backend,
            "dim": self.identity.dim,
            "int8": self.int8,
            "size_bytes": self.size_bytes,
            "source": self.source,
        }


def _describe(folder: Path, source: str, name: str | None = None) -> ModelFolder:
    from .encoders.towers import folder_identity, tower_file

    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    int8 = (folder / tower_file("image", "int8")).is_file()
    return ModelFolder(folder, folder_identity(folder, name or folder.name), int8, size, source)


def export(
    spec: ModelSpec,
    out: str | Path | None = None,
    *,
    int8: bool = True,
    notice: Callable[[str], None] | None = None,
) -> ModelFolder:
    """Export ``spec``'s model as a tower folder: into the ONNX cache, and copied to ``out`` if
    given (a new or empty folder). ``int8``: also the int8 image tower."""
    from .encoders import check_runtime, load_encoder, require_torch
    from .encoders.towers import find_export, quantize, runs_without_torch, spec_folder, tower_file

    spec = dataclasses.replace(spec, runtime="onnx", device="cpu", precision="int8" if int8 else "fp32")
    check_runtime(spec)
    target = Path(out).expanduser() if out is not None else None
    if target is not None and target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UsageError(f"{target} exists and is not an empty folder; name a new folder", param="out")
    if spec.backend == "onnx":
        source = spec_folder(spec)
        name = spec.model if spec.weights is None else Path(spec.weights).name
        if target is None:
            return _describe(source, "hub", name)
        shutil.copytree(source, target, dirs_exist_ok=True)
        if int8 and not (target / tower_file("image", "int8")).is_file():
            quantize(target)
        return _describe(target, "export", name)
    folder = find_export(spec, spec.precision)
    if folder is None:
        require_torch(f"exporting {spec.label} to ONNX")
        if notice:
            notice(f"exporting {spec.label} to ONNX ...")
        encoder = load_encoder(spec)
        folder = getattr(encoder, "folder", None)
        if folder is None or not runs_without_torch(folder, spec.precision):
            raise UsageError(
                f"{spec.label} was exported, but its tokenizer cannot be written as tokenizer.json, so its "
                "text tower needs torch to tokenise; it cannot run from a folder of its own",
                param="model",
            )
    if target is None:
        return _describe(folder, "export")
    shutil.copytree(folder, target, dirs_exist_ok=True)
    return _describe(target, "export")


def cached() -> list[ModelFolder]:
    """The exports in the ONNX cache, then the tower repositories in the Hugging Face cache."""
    from .encoders.towers import is_tower_folder, list_exports

    found = [_describe(folder, "export") for folder, _ in list_exports()]
    try:
        from huggingface_hub import scan_cache_dir

        repos = scan_cache_dir().repos
    except Exception:  # no hub cache yet (or an unreadable one): nothing published is cached
        repos = frozenset()
    for repo in sorted(repos, key=lambda r: r.repo_id):
        for revision in sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True):
            if repo.repo_type == "model" and is_tower_folder(revision.snapshot_path):
                found.append(_describe(revision.snapshot_path, "hub", repo.repo_id))
                break
    return found
