"""One entry point for every decoder: `generate(model, batch, DecodeConfig) -> Output`.

Decoders (each module defines `generate(model, batch, cfg) -> Output`):
- "ar":      echocxr.decode.ar       one token per forward, static KV cache
- "block":   echocxr.decode.block    K denoising steps per block (the RAD teacher)
- "onestep": echocxr.decode.onestep  one denoising forward per block; `fused` writes the previous
                                      block's KV in the same forward (N forwards for N blocks)
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from echocxr.errors import UserError
from echocxr.model.denoise import STRATEGIES

DECODERS = {"ar": "echocxr.decode.ar", "block": "echocxr.decode.block", "onestep": "echocxr.decode.onestep"}


@dataclass(frozen=True)
class DecodeConfig:
    decoder: str = "ar"
    max_new_tokens: int = 160
    block_size: int = 8
    steps: int = 8  # denoising steps per block ("block" decoder only); 1 <= steps <= block_size
    strategy: str = "confidence_dynamic"
    threshold: float = 0.85  # confidence_dynamic: commit every position above it (and the scheduled count)
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    fused: bool = True  # "onestep": fused block KV cache
    record_trajectory: bool = False
    trajectory_top_k: int = 64  # distributions kept per committed position when recording
    seed: int = 0

    def __post_init__(self) -> None:
        if self.decoder not in DECODERS:
            raise UserError(f"unknown decoder {self.decoder!r}; choose one of {sorted(DECODERS)}")
        if self.strategy not in STRATEGIES:
            raise UserError(f"unknown unmasking strategy {self.strategy!r}; choose one of {STRATEGIES}")
        if self.decoder == "block" and not 1 <= self.steps <= self.block_size:
            raise UserError(f"steps must be in 1..block_size ({self.block_size}), got {self.steps}")


def generate(model, batch, cfg: DecodeConfig):
    return importlib.import_module(DECODERS[cfg.decoder]).generate(model, batch, cfg)
