"""Multi-step block-diffusion decoding (ECHO_Base, the Stage-3 teacher).

The loop, the unmasking strategies (`choose`) and the trajectory records live in `model.denoise`
(Stage 3 records the teacher's trajectory with the same loop, and training must not import the
decoders); its docstring describes them. This module runs that loop inside the engine:

- the cached fast path (`EngineContext`): every block forward is the engine's `Step` over its
  reused KV cache (any step mode: eager, static, graph, compile);
- `reference=True`, the uncached slow path (`model.denoise.UncachedContext`): every forward
  recomputes the whole context [prompt | committed blocks | current block] from scratch.
  tests/test_block_decode.py checks that it gives the same tokens as the cached path.

The loop applies the engine's decoding guard and hands every finished block to `Run.commit` (EOS,
per-row caps, commit events). Token shift (`model.layout.AR_SHIFT`): the same rule as in RAD
training; token j of a block is read from slot j-1, and token 0 from the last committed token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from echocxr.model import denoise
from echocxr.model.denoise import WINDOW, StepRecord, Trajectory, choose  # noqa: F401 (public here)
from echocxr.model.layout import AR_SHIFT

if TYPE_CHECKING:
    from echocxr.decode.engine import Run


class EngineContext:
    """Block forwards over the engine's KV cache (`model.denoise.CachedContext`'s contract)."""

    def __init__(self, run: Run, block: int):
        self.run, self.block = run, block
        self.first = run.first  # [rows, V] logits at the last committed token (the prefill's)
        self.offset = 0  # response tokens committed so far

    def denoise(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [rows, B] (mask tokens and committed ones) -> (hidden [rows, B, D], first [rows, V]).
        Writes the block's keys past the committed length without committing them."""
        return self.run.forward(ids, self.offset, self.block), self.first

    def commit(self, ids: torch.Tensor) -> None:
        h = self.run.forward(ids, self.offset, self.block)
        self.run.cache.commit(ids.shape[1])
        self.offset += ids.shape[1]
        self.first = self.run.model.logits(h[:, -1]).float()


class CountedReference(denoise.UncachedContext):
    """The uncached reference, counting its forwards on the run like the cached path does."""

    def __init__(self, run: Run, block: int):
        super().__init__(run.model, run.batch, run.n_tokens, block)
        self.run = run

    def denoise(self, ids):
        self.run.forwards += 1
        return super().denoise(ids)

    def commit(self, ids):
        self.run.forwards += 1
        super().commit(ids)


def decode(run: Run, *, reference: bool = False) -> dict:
    """Up to K denoising forwards per block, then one commit forward (none after the last block)."""
    cfg = run.cfg

    def finished(ids: torch.Tensor) -> torch.Tensor:
        run.commit(ids)
        return run.done

    res = denoise.denoise_blocks(
        run.model,
        (CountedReference if reference else EngineContext)(run, cfg.block_size),
        run.rows,
        block=cfg.block_size,
        steps=cfg.steps,
        max_new_tokens=run.n_tokens,
        strategy=cfg.strategy,
        threshold=cfg.threshold,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        seed=run.seeds,  # one generator per row
        record_top_k=cfg.trajectory_top_k if cfg.record_trajectory else None,
        banned=run.banned,
        commit=finished,
    )
    run.trajectory = res.trajectory
    return {
        "blocks": res.blocks,
        "denoise_steps": res.denoise_steps,
        "shift": AR_SHIFT,
        "strategy": cfg.strategy,
    }
