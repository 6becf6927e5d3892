"""Multi-step block-diffusion decoding (ECHO_Base, the Stage-3 teacher).

Prefill the prompt once. Then, block by block: start from B mask tokens, run up to K denoising
forwards over the block (it attends to every committed slot and to itself bidirectionally,
`masks.decode_block`); each forward commits some still-masked positions (`cfg.strategy`); then one
forward over the finished block writes its exact keys/values and `cache.commit(B)`. The commit
forward of the last block is skipped (nothing reads it), so N blocks of K steps cost N*K + N - 1
forwards after the prefill (fewer when the dynamic strategy finishes a block early).

Unmasking (`cfg.strategy`), with m masked positions left and k = K - s steps left, the scheduled
count is ceil(m / k), so every block is finished within K steps:
- confidence_static:  commit the scheduled count, most confident first (confidence = probability
                      of the sampled token under the sampling distribution);
- confidence_dynamic: commit every masked position whose confidence exceeds `cfg.threshold`, and
                      at least the scheduled count;
- sequential:         commit the scheduled count, leftmost first (steps == B: one token per step).

Token shift (`train.rad.AR_SHIFT`): the same rule as in RAD training; token j of a block is read
from slot j-1, and token 0 from the last committed token before the block (the prefill's last
logits for block 0, then the commit forward's last hidden state).

A row stops after the block that holds its first EOS; its later blocks are filled with EOS and it
commits nothing more, while the other rows continue (one shape for the whole batch).

`reference=True` runs the same loop without a cache: every forward recomputes the whole context
[prompt | committed blocks | current block] from scratch. tests/test_block_decode.py checks that it
gives the same tokens as the cached path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from echocxr.decode.common import guard, text_positions
from echocxr.model.masks import block_causal
from echocxr.train.rad import AR_SHIFT, logits_for_block

if TYPE_CHECKING:
    from echocxr.decode.engine import Run


@dataclass
class StepRecord:
    """What one denoising step committed in one block of one row (Stage 3 builds its targets
    from these). The distributions are the model's own (softmax of the logits at temperature 1,
    before top-k/top-p filtering), taken at the step the position was committed."""

    positions: list[int]  # in-block offsets (0..B-1) committed at this step, ascending
    tokens: list[int]  # the committed tokens
    confidence: list[float]  # probability of each committed token under the sampling distribution
    top_idx: torch.Tensor  # [n, k] int64: the k most probable tokens at each committed position
    top_p: torch.Tensor  # [n, k] float32: their probabilities
    rest: torch.Tensor  # [n] float32: probability mass outside the top k (1 - top_p.sum(-1))


# trajectory[row][block][step]: the steps a row took in each block it decoded, up to its EOS block.
Trajectory = list[list[list[StepRecord]]]


class CachedContext:
    """Block forwards over the engine's exact KV cache (the fast path, `engine.Step`)."""

    def __init__(self, run: Run, block: int):
        self.run, self.block = run, block
        self.first = run.first  # [rows, V] logits at the last committed token
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


class UncachedContext:
    """The slow reference: every forward recomputes [prompt | committed | block] from scratch."""

    def __init__(self, run: Run, block: int):
        model, batch = run.model, run.batch
        self.run, self.model, self.block, self.batch = run, model, block, batch
        self.x_prompt = model.embed(batch.prompt_ids, batch.pixel_values, batch.grid_thw)
        self.pos_prompt = model.positions(batch.prompt_ids, batch.grid_thw, valid=batch.prompt_valid)
        self.next_pos = self.pos_prompt.amax(dim=(0, 2)) + 1
        self.committed = batch.prompt_ids.new_zeros(batch.size, 0)

    def denoise(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.run.forwards += 1
        rows, P = self.batch.prompt_ids.shape
        resp = torch.cat([self.committed, ids], 1)
        x = torch.cat([self.x_prompt, self.model.embed(resp)], 1)
        pos = torch.cat([self.pos_prompt, text_positions(self.next_pos, 0, resp.shape[1])], 2)
        S = x.shape[1]
        q = torch.arange(S, device=x.device)[:, None]
        k = torch.arange(S, device=x.device)[None, :]
        # the prompt is causal; the response is block-causal and sees the whole prompt
        rule = ((k < P) & (q >= k)) | ((k >= P) & (q >= P) & block_causal(q, k, block=self.block, offset=P))
        valid = torch.cat([self.batch.prompt_valid, torch.ones_like(resp, dtype=torch.bool)], 1)
        mask = (rule[None] & valid[:, None, :]) | torch.eye(S, dtype=torch.bool, device=x.device)
        h = self.model(x, pos, mask[:, None])
        B = ids.shape[1]
        return h[:, -B:], self.model.logits(h[:, -B - 1]).float()

    def commit(self, ids: torch.Tensor) -> None:
        self.run.forwards += 1  # the cached path's commit forward, counted alike
        self.committed = torch.cat([self.committed, ids], 1)


def choose(conf: torch.Tensor, masked: torch.Tensor, steps_left: int, strategy: str, threshold: float):
    """Which masked positions to commit now. conf, masked [rows, B] -> bool [rows, B]."""
    B = masked.shape[1]
    m = masked.sum(1)
    n = -(-m // steps_left)  # the scheduled count: ceil(m / steps_left), 0 for finished rows
    if strategy == "sequential":
        score = -torch.arange(B, device=conf.device, dtype=conf.dtype).expand_as(conf)
    else:
        score = conf
        if strategy == "confidence_dynamic":
            n = torch.maximum(n, ((conf > threshold) & masked).sum(1))
    score = score.masked_fill(~masked, float("-inf"))
    order = score.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(B, device=conf.device).expand_as(order))
    return (rank < n[:, None]) & masked


def _record(positions, tokens, conf, probs, k: int) -> StepRecord:
    """One row's committed positions at one step; probs [n, V] of those positions."""
    top = probs.topk(min(k, probs.shape[-1]), dim=-1)
    return StepRecord(
        positions=positions,
        tokens=tokens,
        confidence=conf,
        top_idx=top.indices.cpu(),
        top_p=top.values.float().cpu(),
        rest=(1 - top.values.float().sum(-1)).clamp_min(0).cpu(),
    )


def decode(run: Run, *, reference: bool = False) -> dict:
    """Up to K denoising forwards per block, then one commit forward (none after the last block).
    reference: every forward recomputes the whole context (`UncachedContext`)."""
    cfg, model = run.cfg, run.model
    B, K, eos, mask_id, rows = cfg.block_size, cfg.steps, run.eos, run.mask_id, run.rows
    n_blocks = -(-run.n_tokens // B)
    ctx = (UncachedContext if reference else CachedContext)(run, B)
    trajectory: Trajectory | None = [[] for _ in range(rows)] if cfg.record_trajectory else None
    steps_run = 0
    for i in range(n_blocks):
        ids = torch.full((rows, B), mask_id, dtype=torch.long, device=run.device)
        ids[run.done] = eos
        masked = ~run.done[:, None].expand(rows, B).clone()
        if trajectory is not None:
            for r in (~run.done).nonzero().flatten().tolist():
                trajectory[r].append([])
        for s in range(K):
            if not bool(masked.any()):
                break
            h, first = ctx.denoise(ids)
            steps_run += 1
            logits = logits_for_block(model, h, first)  # [rows, B, V]
            tokens, conf = run.pick(logits)
            pick = choose(conf, masked, K - s, cfg.strategy, cfg.threshold)
            ids = torch.where(pick, tokens, ids)
            masked &= ~pick
            if trajectory is not None:
                probs = guard(logits, run.banned).softmax(-1)  # what was sampled from (T = 1)
                for r, j in _rows_positions(pick):
                    trajectory[r][-1].append(
                        _record(j, ids[r, j].tolist(), conf[r, j].tolist(), probs[r, j], cfg.trajectory_top_k)
                    )
        ids = run.commit(ids)
        if run.all_done or i == n_blocks - 1:
            break
        ctx.commit(ids)
    run.trajectory = trajectory
    return {"blocks": i + 1, "denoise_steps": steps_run, "shift": AR_SHIFT, "strategy": cfg.strategy}


def _rows_positions(pick: torch.Tensor):
    """bool [rows, B] -> (row, ascending in-block positions) for rows that committed something."""
    for r, row in enumerate(pick.cpu().tolist()):
        j = [p for p, on in enumerate(row) if on]
        if j:
            yield r, j
