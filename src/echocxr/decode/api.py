"""One entry point for a single decode: `generate(model, batch, DecodeConfig) -> Output`.

It builds a one-call `decode.engine.Engine`; code that decodes more than once (the CLI, eval, the
benchmark, a server) should keep one Engine instead, so its cache and compiled steps are reused.
"""

from __future__ import annotations

from echocxr.decode.common import Output
from echocxr.decode.config import DECODERS, STRATEGIES, DecodeConfig
from echocxr.decode.engine import Engine

__all__ = ["DECODERS", "STRATEGIES", "DecodeConfig", "Engine", "Output", "generate"]


def generate(model, batch, cfg: DecodeConfig, *, mode: str | None = None, reference: bool = False) -> Output:
    """Decode `batch` with `cfg` on the model's device. mode: the step mode (`engine.Step.MODES`;
    default graph on CUDA, eager elsewhere); reference: the uncached slow path ("block" only)."""
    return Engine(model, cfg, device=model.device, mode=mode).generate(batch, reference=reference)
