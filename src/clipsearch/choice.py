"""The model a caller asks for (``ModelChoice``), before anything is loaded: the command line's
model options and the library's keyword arguments in one value, resolved against a namespace's
recorded model by ``resolve``. Light on purpose: the CLI builds its options from it without
importing numpy, the store or any encoder."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .identity import DEFAULT_MODEL, DEFAULT_PRETRAINED, ModelSpec


@dataclass(frozen=True)
class ModelChoice:
    """The model a caller asked for; ``None`` means "not said", so that the namespace's recorded
    model (else the default) applies. ``runtime`` and ``precision`` given alone apply to the
    recorded model: they choose how to run it, not which model it is."""

    model: str | None = None
    pretrained: str | None = None
    weights: str | Path | None = None
    device: str = "auto"
    runtime: str | None = None
    precision: str | None = None
    decode: str | None = None

    @property
    def names_a_model(self) -> bool:
        return self.model is not None or self.pretrained is not None or self.weights is not None

    def resolve(self, recorded: dict[str, Any] | None) -> ModelSpec:
        """The model to load: these arguments, else ``recorded`` (a namespace's), else the default."""
        if not self.names_a_model and recorded:
            spec = ModelSpec.from_dict(recorded, self.device)
        else:
            spec = ModelSpec(
                model=self.model or DEFAULT_MODEL,
                pretrained=self.pretrained if self.pretrained is not None else _default_tag(self.weights),
                weights=Path(self.weights).expanduser() if self.weights is not None else None,
                device=self.device,
            )
        if self.runtime is not None:
            spec = dataclasses.replace(spec, runtime=self.runtime.strip().lower())
        elif spec.backend == "onnx":
            spec = dataclasses.replace(spec, runtime="onnx")  # a tower folder runs on ONNX Runtime
        if self.precision is not None:
            spec = dataclasses.replace(spec, precision=self.precision.strip().lower())
        if self.decode is not None:
            spec = dataclasses.replace(spec, decode=self.decode.strip().lower())
        return spec


def _default_tag(weights: str | Path | None) -> str | None:
    """A checkpoint file given without a tag is recorded as what it is (``file:NAME``), not as
    OpenAI's weights; only the hub default, with no file, is ``openai``."""
    return DEFAULT_PRETRAINED if weights is None else None
