"""Confidence-ordered block denoising: the multi-step teacher's rollout (ECHO_Base, Sec. 3.3).

This lives in `model/` because two floors use it: the block decoder (`decode.block`) and Stage 3,
whose Phase 1 records the teacher's trajectory (`train.dcd`). Training must not import the
decoders, so the loop and the pieces it needs (prefill, sampling, the unmasking rule, the cached
and uncached contexts) sit here; `decode/` adds the fast forward modes (static shapes, CUDA graphs).

Prefill the prompt once. Then, block by block: start from B mask tokens, run up to K denoising
forwards over the block (it attends to every committed slot and to itself bidirectionally); each
forward commits some still-masked positions (`strategy`); then one forward over the finished block
writes its exact keys/values and commits them. The commit forward of the last block is skipped, so
N blocks of K steps cost N*K + N - 1 forwards after the prefill (fewer when the dynamic strategy
finishes a block early).

Unmasking, with m masked positions left and k = K - s steps left, the scheduled count is
ceil(m / k), so every block is finished within K steps:
- confidence_static:  commit the scheduled count, most confident first (confidence = probability
                      of the sampled token under the sampling distribution);
- confidence_dynamic: commit every masked position whose confidence exceeds `threshold`, and
                      at least the scheduled count n, most confident first among the 2n
                      leftmost masked positions (`WINDOW`, see `choose`);
- confidence_threshold: the same threshold rule, with the scheduled count taken most confident
                      first anywhere in the block (no window): the paper's confidence order
                      (Fast-dLLM's threshold decoding);
- sequential:         commit the scheduled count, leftmost first (steps == B: one token per step).

A row stops after the block that holds its first EOS; its later blocks are filled with EOS and it
commits nothing more, while the other rows continue (one shape for the whole batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from echocxr.model.kvcache import KVCache
from echocxr.model.layout import (
    AR_SHIFT,
    decode_mask,
    logits_for_block,
    prompt_inputs,
    text_positions,
    uncached_inputs,
)

# the unmasking orders (module docstring)
STRATEGIES = ("confidence_dynamic", "confidence_threshold", "confidence_static", "sequential")

# The block defaults, one source for RAD training, DCD's teacher, the decoders and eval (all of
# them import this module; `decode.config.DecodeConfig` repeats none of them).
BLOCK_SIZE = 8  # B (paper: 4, 8 or 16)
STRATEGY = "confidence_dynamic"
THRESHOLD = 0.85  # confidence_dynamic: commit every masked position above it
RECORD_TOP_K = 64  # teacher probabilities kept per committed position when recording a trajectory


# -- prefill, sampling --------------------------------------------------------------------------------


@dataclass
class Prefilled:
    cache: KVCache  # prompt committed: cache.length == P
    next_pos: torch.Tensor  # [B] first text position after each row's prompt
    last_logits: torch.Tensor  # [B, V] logits at the last prompt token (the first AR prediction)


@torch.no_grad()
def prefill(
    model, batch, max_new_tokens: int = 0, *, extra_slots: int = 0, cache: KVCache | None = None
) -> Prefilled:
    """Run the prompt (images + instruction) once and keep its KV.

    Without `cache`, allocates one with room for max_new_tokens (+ extra_slots for blocks denoised
    ahead of the committed length). With `cache` (`decode.engine`'s, reused across calls) its
    length and padding marks are reset; slots past the prompt keep stale values that no query
    reads before the forward that rewrites them. Raises ValueError if the cache does not fit.
    """
    B, P = batch.prompt_ids.shape
    x, pos = prompt_inputs(model, batch)
    if cache is None:
        shape = (model.n_layers, B, model.n_kv_heads, model.head_dim)
        cache = KVCache.allocate(*shape, P + max_new_tokens + extra_slots, dtype=x.dtype, device=x.device)
    if cache.k.shape[1] != B or cache.capacity < P + max_new_tokens + extra_slots:
        raise ValueError(f"cache of {cache.k.shape[1]} rows x {cache.capacity} slots for {B} rows x {P}")
    cache.length = 0
    cache.key_valid.fill_(True)
    cache.key_valid[:, :P] = batch.prompt_valid
    h = model(x, pos, decode_mask(cache.key_valid, 0, P), cache=cache, start=0)
    cache.commit(P)
    return Prefilled(cache, pos.amax(dim=(0, 2)) + 1, model.logits(h[:, -1]).float())


def banned_tokens(model, tokenizer=None) -> torch.Tensor:
    """bool [V] on the model's device: the ids no decoder may sample or commit (issue #14 item 6).

    The diffusion mask token and every special token other than EOS (pad, image and vision
    markers from `model.special`; with a tokenizer also its declared special and added-special
    tokens), plus, with a tokenizer, the LM-head rows past its vocabulary (ids it cannot decode).
    The current `model.special.eos` is never banned.
    """
    V, s = model.vocab_size, model.special
    ids = {s.mask, s.pad, s.image, s.vision_start, s.vision_end}
    banned = torch.zeros(V, dtype=torch.bool, device=model.device)
    if tokenizer is not None:
        ids |= set(tokenizer.all_special_ids)
        ids |= {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        banned[len(tokenizer) :] = True
    ids.discard(s.eos)
    banned[[i for i in ids if 0 <= i < V]] = True
    return banned


def guard(logits: torch.Tensor, banned: torch.Tensor | None) -> torch.Tensor:
    """logits [..., V] -> float logits with the banned ids at -inf (the decoding guard), applied
    before any sampling, confidence or recorded distribution, so a banned id gets probability 0."""
    logits = logits.float()
    return logits if banned is None else logits.masked_fill(banned, float("-inf"))


SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts


def row_generators(seeds, device) -> list[torch.Generator]:
    """One generator per row, seeded with that row's seed, so a row's draws do not depend on what
    else is in its batch. Raises ValueError for a seed outside SEED_MIN..SEED_MAX."""
    bad = [s for s in seeds if not SEED_MIN <= s <= SEED_MAX]
    if bad:
        raise ValueError(f"seed {bad[0]} is outside {SEED_MIN}..{SEED_MAX}")
    return [torch.Generator(device=device).manual_seed(s) for s in seeds]


def sample(
    logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, generator=None
):
    """logits [rows, ..., V] -> (tokens [rows, ...], probability of each chosen token under the
    filtered distribution). generator: one for every draw, or a list with one per row (see
    `row_generators`); a row whose entry is None takes its most probable token and draws nothing
    (a finished row, or one with nothing to commit), so each row's generator advances only with
    that row's own draws."""
    logits = logits.float()
    if temperature <= 0:
        probs = logits.softmax(-1)
        tok = probs.argmax(-1)
        return tok, probs.gather(-1, tok[..., None])[..., 0]
    logits = logits / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    probs = logits.softmax(-1)
    V = probs.shape[-1]
    if isinstance(generator, list | tuple):
        tok = probs.argmax(-1)
        for r, g in enumerate(generator):
            if g is not None:  # this row's draws: [n, V] -> [n] -> the row's shape
                tok[r] = torch.multinomial(probs[r].reshape(-1, V), 1, generator=g).reshape(tok[r].shape)
    else:
        tok = torch.multinomial(probs.reshape(-1, V), 1, generator=generator).reshape(probs.shape[:-1])
    return tok, probs.gather(-1, tok[..., None])[..., 0]


def cut_at_eos(rows: torch.Tensor, eos: int) -> list[list[int]]:
    """[B, T] ids -> per row, the ids up to and including the first EOS."""
    out = []
    for r in rows.tolist():
        out.append(r[: r.index(eos) + 1] if eos in r else r)
    return out


# -- contexts: where a block forward runs -----------------------------------------------------------


class EagerBlockForward:
    """forward(ids [rows, Q], offset) -> hidden [rows, Q, D]: whole blocks placed after the committed
    cache slots, attending to the used slots only (`decode.engine.Step` adds static-shape
    and CUDA-graph modes that agree with it)."""

    def __init__(self, model, cache: KVCache, next_pos: torch.Tensor, block: int):
        self.model, self.cache, self.next_pos, self.block = model, cache, next_pos, block

    def __call__(self, ids: torch.Tensor, offset: int) -> torch.Tensor:
        cache, Q = self.cache, ids.shape[1]
        pos = text_positions(self.next_pos, offset, Q)
        mask = decode_mask(cache.key_valid, cache.length, Q, self.block)
        return self.model(self.model.embed(ids), pos, mask, cache=cache)


class CachedContext:
    """Block forwards over the exact KV cache (the fast path). `make_forward(model, cache, next_pos,
    block)` builds the forward (default: `EagerBlockForward`)."""

    mode = "eager"

    def __init__(self, model, batch, n_tokens: int, block: int, make_forward=None):
        self.model = model
        pre = prefill(model, batch, n_tokens)
        self.cache = pre.cache
        self.first = pre.last_logits  # [rows, V] logits at the last committed token
        self.forward = (make_forward or EagerBlockForward)(model, pre.cache, pre.next_pos, block)
        self.offset = 0  # response tokens committed so far

    def denoise(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [rows, B] (mask tokens and committed ones) -> (hidden [rows, B, D], first [rows, V]).
        Writes the block's keys past the committed length without committing them."""
        return self.forward(ids, self.offset), self.first

    def commit(self, ids: torch.Tensor) -> None:
        h = self.forward(ids, self.offset)
        self.cache.commit(ids.shape[1])
        self.offset += ids.shape[1]
        self.first = self.model.logits(h[:, -1]).float()


class UncachedContext:
    """The slow reference: every forward recomputes [prompt | committed | block] from scratch."""

    mode = "reference"

    def __init__(self, model, batch, n_tokens: int, block: int):
        self.model, self.block, self.batch = model, block, batch
        self.x_prompt, self.pos_prompt = prompt_inputs(model, batch)
        self.committed = batch.prompt_ids.new_zeros(batch.size, 0)

    def denoise(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        resp = torch.cat([self.committed, ids], 1)
        x, pos, mask = uncached_inputs(
            self.model, self.batch, self.x_prompt, self.pos_prompt, resp, self.block
        )
        h = self.model(x, pos, mask)
        B = ids.shape[1]
        return h[:, -B:], self.model.logits(h[:, -B - 1]).float()

    def commit(self, ids: torch.Tensor) -> None:
        self.committed = torch.cat([self.committed, ids], 1)


# -- the unmasking rule and the trajectory ------------------------------------------------------------


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


# confidence_dynamic: below the threshold, the scheduled count n is taken from the WINDOW * n
# leftmost masked positions only (docs/RAD.md, "Block 8"). 2 keeps K = 2 at B = 8 unchanged (the
# first step's window is the whole block) and at K = B lets a step choose between the next two.
WINDOW = 2


def choose(conf: torch.Tensor, masked: torch.Tensor, steps_left: int, strategy: str, threshold: float):
    """Which masked positions to commit now. conf, masked [rows, B] -> bool [rows, B].

    confidence_dynamic commits every masked position above `threshold`, anywhere in the block,
    and fills the rest of the scheduled count n = ceil(m / steps_left) most confident first among
    the WINDOW * n leftmost masked positions only; confidence_threshold is the same rule without
    the window (the paper's confidence order). Without the window, a step in which nothing
    is confident commits the block's most confident position, and at B = 8 that is typically a
    filler token far to the right (" the" at position 5 with probability 0.3) whose marginal pools
    many report templates; every later step then fills the block around it, so the first content
    word is chosen to fit the filler, not the image: the block-8 teacher degraded from K = 2 to
    K = 8 (docs/RAD.md, "Block 8")."""
    B = masked.shape[1]
    m = masked.sum(1)
    n = -(-m // steps_left)  # the scheduled count: ceil(m / steps_left), 0 for finished rows
    if strategy == "sequential":
        score = -torch.arange(B, device=conf.device, dtype=conf.dtype).expand_as(conf)
    elif strategy in ("confidence_dynamic", "confidence_threshold"):
        above = (conf > threshold) & masked
        left_rank = masked.long().cumsum(1) - 1  # 0 for the leftmost masked position
        in_window = masked & (left_rank < WINDOW * n[:, None])
        if strategy == "confidence_threshold":
            in_window = masked
        # confidences are in [0, 1]: above-threshold positions first, then the window by confidence
        score = torch.where(above, 2.0, torch.where(in_window, conf, -1.0))
        n = torch.maximum(n, above.sum(1))
    else:
        score = conf
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


def _rows_positions(pick: torch.Tensor):
    """bool [rows, B] -> (row, ascending in-block positions) for rows that committed something."""
    for r, row in enumerate(pick.cpu().tolist()):
        j = [p for p, on in enumerate(row) if on]
        if j:
            yield r, j


# -- the loop -----------------------------------------------------------------------------------------


@dataclass
class Denoised:
    tokens: list[list[int]]  # per row, up to and including the first EOS (at most max_new_tokens)
    forwards: int  # model forwards after the prefill
    blocks: int  # blocks decoded
    denoise_steps: int
    trajectory: Trajectory | None


@torch.no_grad()
def denoise_blocks(
    model,
    ctx,
    rows: int,
    *,
    block: int,
    steps: int,
    max_new_tokens: int,
    strategy: str = STRATEGY,
    threshold: float = THRESHOLD,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | list[int] = 0,
    record_top_k: int | None = None,
    banned: torch.Tensor | None = None,
    commit=None,
) -> Denoised:
    """Decode ceil(max_new_tokens / block) blocks of `block` tokens in up to `steps` forwards each
    through `ctx` (`CachedContext` or `UncachedContext`, built for that many tokens). With
    record_top_k, also return the trajectory with that many probabilities per committed position.
    seed: one for every row, or one per row; each row samples from its own generator and draws only
    while it has masked positions, so a row's tokens do not depend on its batch-mates.
    banned: bool [V], the decoding guard (`banned_tokens`; None: no guard). commit(ids [rows, B]) ->
    bool [rows]: called with every finished block, returns the rows that are now finished
    (`decode.engine` applies EOS, per-row caps and commit events there); default: a row is
    finished once a block holds its EOS."""
    B, K, eos, mask_id = block, steps, model.special.eos, model.special.mask
    n_blocks = -(-max_new_tokens // B)
    device = model.device
    seeds = [seed] * rows if isinstance(seed, int) else list(seed)
    gens = row_generators(seeds, device) if temperature > 0 else None
    out = torch.full((rows, n_blocks * B), eos, dtype=torch.long, device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    trajectory: Trajectory | None = [[] for _ in range(rows)] if record_top_k else None
    forwards = steps_run = 0
    for i in range(n_blocks):
        ids = torch.full((rows, B), mask_id, dtype=torch.long, device=device)
        ids[done] = eos
        masked = ~done[:, None].expand(rows, B).clone()
        if trajectory is not None:
            for r in (~done).nonzero().flatten().tolist():
                trajectory[r].append([])
        for s in range(K):
            if not bool(masked.any()):
                break
            h, first = ctx.denoise(ids)
            forwards, steps_run = forwards + 1, steps_run + 1
            logits = guard(logits_for_block(model, h, first, AR_SHIFT), banned)  # [rows, B, V]
            drawing = None  # rows with nothing masked (block or row finished) draw nothing
            if gens is not None:
                drawing = [g if on else None for g, on in zip(gens, masked.any(1).tolist(), strict=True)]
            tokens, conf = sample(logits, temperature, top_k, top_p, drawing)
            pick = choose(conf, masked, K - s, strategy, threshold)
            ids = torch.where(pick, tokens, ids)
            masked &= ~pick
            if trajectory is not None:
                probs = logits.softmax(-1)
                for r, j in _rows_positions(pick):
                    trajectory[r][-1].append(
                        _record(j, ids[r, j].tolist(), conf[r, j].tolist(), probs[r, j], record_top_k)
                    )
        out[:, i * B : (i + 1) * B] = ids
        done = (done | (ids == eos).any(1)) if commit is None else commit(ids)
        if bool(done.all()) or i == n_blocks - 1:
            break
        ctx.commit(ids)
        forwards += 1
    tokens = [t[:max_new_tokens] for t in cut_at_eos(out[:, : (i + 1) * B].cpu(), eos)]
    return Denoised(tokens, forwards, i + 1, steps_run, trajectory)
