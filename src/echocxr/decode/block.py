"""Multi-step block-diffusion decoding (ECHO_Base, the Stage-3 teacher).

The loop, the unmasking strategies (`choose`) and the trajectory records live in `model.denoise`
(Stage 3 records the teacher's trajectory with the same loop, and training must not import the
decoders); its docstring describes them. This module picks where each block forward runs:

- the cached fast path (`CachedContext`) in one of `onestep.BlockForward`'s modes: "eager",
  the static-shape "static", the CUDA-graph "graph" or "compile";
- `reference=True`, the uncached slow path: every forward recomputes the whole context
  [prompt | committed blocks | current block] from scratch. tests/test_block_decode.py checks that
  it gives the same tokens as the cached path.

Token shift (`model.layout.AR_SHIFT`): the same rule as in RAD training; token j of a block is read
from slot j-1, and token 0 from the last committed token before it.
"""

from __future__ import annotations

import torch

from echocxr.decode.common import Output
from echocxr.decode.onestep import BlockForward
from echocxr.model import denoise
from echocxr.model.denoise import StepRecord, Trajectory, UncachedContext, choose  # noqa: F401 (public here)
from echocxr.model.layout import AR_SHIFT
from echocxr.model.vlm import EchoVLM


class CachedContext(denoise.CachedContext):
    """Block forwards over the exact KV cache; `mode` picks how a forward runs
    (`onestep.BlockForward`; default "graph" on CUDA, "eager" elsewhere)."""

    def __init__(self, model: EchoVLM, batch, n_tokens: int, block: int, mode: str | None = None):
        cuda = batch.prompt_ids.is_cuda
        self.mode = mode or ("graph" if cuda else "eager")
        super().__init__(
            model, batch, n_tokens, block, lambda m, c, p, b: BlockForward(m, c, p, b, self.mode)
        )


@torch.no_grad()
def generate(model: EchoVLM, batch, cfg, *, reference: bool = False, mode: str | None = None) -> Output:
    """reference: the uncached slow path. mode: "eager" | "static" | "graph" | "compile" for the
    cached path (default: graph on CUDA, eager elsewhere; see `onestep.BlockForward`)."""
    n_tokens = -(-cfg.max_new_tokens // cfg.block_size) * cfg.block_size
    if reference:
        ctx = UncachedContext(model, batch, n_tokens, cfg.block_size)
    else:
        ctx = CachedContext(model, batch, n_tokens, cfg.block_size, mode)
    res = denoise.denoise_blocks(
        model,
        ctx,
        batch.size,
        block=cfg.block_size,
        steps=cfg.steps,
        max_new_tokens=cfg.max_new_tokens,
        strategy=cfg.strategy,
        threshold=cfg.threshold,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        seed=cfg.seed,
        record_top_k=cfg.trajectory_top_k if cfg.record_trajectory else None,
    )
    stats = {"blocks": res.blocks, "denoise_steps": res.denoise_steps, "shift": AR_SHIFT}
    stats.update(strategy=cfg.strategy, mode=ctx.mode)
    return Output(res.tokens, res.forwards, res.trajectory, stats)
