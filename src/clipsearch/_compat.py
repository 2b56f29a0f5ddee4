"""Workarounds for broken third-party installs, kept in one place.

PyPI's torchvision wheels are CUDA builds. Beside a CPU-only torch (our machines' torch 2.13
wheel) their compiled ops library cannot load, and ``import torchvision`` up to 0.28 then dies in
its meta registrations with ``operator torchvision::nms does not exist`` (0.29 checks first).
A user's ``pip install 'clipsearch[torch]'`` gets a matching pair, whose ops load: then nothing
here does anything. open_clip and some transformers processors import
torchvision, although clipsearch never calls a torchvision op (our preprocessing is Pillow +
numpy). Registering the two missing operator schemas makes the import succeed; calling those ops
would still fail loudly, which is what we want.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
from pathlib import Path

import torch

_MISSING_OPS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library: torch.library.Library | None = None


def _has_schema(name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
    except RuntimeError:
        return False
    return True


def _torchvision_ops_loadable(package_dir: Path) -> bool:
    """Load torchvision's compiled ops the way torchvision itself does; False if they cannot load.

    The library's name changes between releases (``_C`` up to 0.28, ``_C_stable`` from 0.29):
    every ``_C*`` extension counts, since registering the schemas beside ops that do load makes
    torchvision's own registration abort the process."""
    libs = sorted(lib for suffix in importlib.machinery.EXTENSION_SUFFIXES for lib in package_dir.glob(f"_C*{suffix}"))
    if not libs:
        return True  # nothing to load, nothing to register against: leave torchvision alone
    for lib in libs:
        try:
            torch.ops.load_library(str(lib))
        except OSError:
            continue
        return True
    return False


def ensure_torchvision_importable() -> bool:
    """Make ``import torchvision`` work; return True if the schemas had to be registered.

    A no-op when torchvision is absent, already imported, or its own ops load fine.
    """
    global _library
    import sys

    if "torchvision" in sys.modules or _library is not None:
        return False
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return False
    if _has_schema("nms") or _torchvision_ops_loadable(Path(spec.origin).parent):
        return False
    _library = torch.library.Library("torchvision", "DEF")
    for name, schema in _MISSING_OPS.items():
        if not _has_schema(name):
            _library.define(schema)
    return True


def import_open_clip():
    """Import open_clip (which imports torchvision) after making that import safe."""
    ensure_torchvision_importable()
    import open_clip

    return open_clip
