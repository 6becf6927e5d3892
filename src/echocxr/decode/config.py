"""`DecodeConfig`: every decoding default, in one place, and how a checkpoint sets them.

Decoders (`decode.engine.Engine` runs them; each module's `decode(run)` is one loop):
- "ar":      echocxr.decode.ar       one token per forward, static KV cache
- "block":   echocxr.decode.block    K denoising steps per block (the RAD teacher)
- "onestep": echocxr.decode.onestep  one denoising forward per block; `fused` writes the previous
                                      block's KV in the same forward (N forwards for N blocks)
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from echocxr.errors import UserError
from echocxr.model import denoise  # the block defaults, beside the loop that uses them
from echocxr.model.config import ModelConfig
from echocxr.model.denoise import STRATEGIES  # the unmasking orders (re-exported by decode.api)

DECODERS = ("ar", "block", "onestep")
# The decoder a checkpoint of each training stage is meant for (echocxr.json "stage").
STAGE_DECODER = {"ar": "ar", "rad": "block", "dcd": "onestep"}


@dataclass(frozen=True)
class DecodeConfig:
    decoder: str = "ar"
    # without a checkpoint, the preset default's response length; a checkpoint's own wins
    max_new_tokens: int = ModelConfig.max_response_tokens
    block_size: int = denoise.BLOCK_SIZE  # B; a checkpoint's trained block size wins
    steps: int | None = None  # denoising steps per block ("block" only), 1..B; None: B (one token/step)
    strategy: str = denoise.STRATEGY
    threshold: float = (
        denoise.THRESHOLD
    )  # confidence_dynamic: commit every position above it (and the scheduled count)
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    fused: bool = True  # "onestep": fused block KV cache
    record_trajectory: bool = False
    trajectory_top_k: int = denoise.RECORD_TOP_K  # distributions kept per committed position when recording
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps is None:
            object.__setattr__(self, "steps", self.block_size)
        if self.decoder not in DECODERS:
            raise UserError(f"unknown decoder {self.decoder!r}; choose one of {list(DECODERS)}")
        if self.strategy not in STRATEGIES:
            raise UserError(f"unknown unmasking strategy {self.strategy!r}; choose one of {STRATEGIES}")
        if self.max_new_tokens < 1 or self.block_size < 1:
            raise UserError(
                f"max_new_tokens and block_size must be >= 1, got {self.max_new_tokens} and {self.block_size}"
            )
        if self.decoder == "block" and not 1 <= self.steps <= self.block_size:
            raise UserError(f"steps must be in 1..block_size ({self.block_size}), got {self.steps}")

    @classmethod
    def from_checkpoint(cls, meta: dict, model_config=None, **overrides) -> DecodeConfig:
        """The settings a checkpoint was trained for, then `overrides` (None means "not given").

        meta: its echocxr.json (`stage` picks the decoder by STAGE_DECODER, `block_size` the block
        size); model_config: its `ModelConfig` (`max_response_tokens` -> max_new_tokens). This is
        the one place checkpoint metadata becomes a DecodeConfig (generate, eval, pipeline, bench).
        Raises UserError for an unknown override name.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise UserError(f"unknown decode setting(s) {unknown}; known: {sorted(known)}")
        base: dict = {}
        if meta.get("stage") in STAGE_DECODER:
            base["decoder"] = STAGE_DECODER[meta["stage"]]
        if meta.get("block_size"):
            base["block_size"] = int(meta["block_size"])
        if model_config is not None:
            base["max_new_tokens"] = int(model_config.max_response_tokens)
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)
