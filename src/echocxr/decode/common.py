"""Pieces every decoder shares: the prefill, masks with padding, sampling, the result type."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from echocxr.batch import Batch
from echocxr.model.kvcache import KVCache
from echocxr.model.masks import decode_causal
from echocxr.model.vlm import EchoVLM


@dataclass
class Prefilled:
    cache: KVCache  # prompt committed: cache.length == P
    next_pos: torch.Tensor  # [B] first text position after each row's prompt
    last_logits: torch.Tensor  # [B, V] logits at the last prompt token (the first AR prediction)


@dataclass
class Output:
    tokens: list[list[int]]  # generated ids per row, up to and including the first EOS
    forwards: int  # model forward passes after the prefill
    trajectory: list | None = None  # block decoders: per block and step, what was committed
    stats: dict = field(default_factory=dict)


def with_padding(cache: KVCache, rule_mask: torch.Tensor) -> torch.Tensor:
    """[Q, K] rule mask -> [B, 1, Q, K] that also hides padded key slots (each query keeps its own
    slot visible so a padded row never has an empty softmax)."""
    Q, K = rule_mask.shape
    m = rule_mask[None, None] & cache.key_valid[:, None, None, :K]
    own = torch.zeros(Q, K, dtype=torch.bool, device=rule_mask.device)
    own[torch.arange(Q), torch.arange(K - Q, K)] = True
    return m | own


def allocate_cache(model: EchoVLM, rows: int, capacity: int) -> KVCache:
    """Empty KV buffers [L, rows, H_kv, capacity, D] in the model's dtype, on its device."""
    return KVCache.allocate(
        model.n_layers,
        rows,
        model.n_kv_heads,
        model.head_dim,
        capacity,
        dtype=model.dtype,
        device=model.device,
    )


@torch.no_grad()
def prefill(
    model: EchoVLM,
    batch: Batch,
    max_new_tokens: int = 0,
    *,
    extra_slots: int = 0,
    cache: KVCache | None = None,
) -> Prefilled:
    """Run the prompt (images + instruction) once and keep its KV.

    Without `cache`, allocates one with room for max_new_tokens (+ extra_slots for blocks
    denoised ahead of the committed length). With `cache` (the engine's, reused across calls) its
    length and padding marks are reset; its rows must equal the batch's; slots past the prompt keep
    stale values that no query reads before the step that rewrites them. Raises ValueError if the
    cache does not fit.
    """
    B, P = batch.prompt_ids.shape
    if cache is None:
        cache = allocate_cache(model, B, P + max_new_tokens + extra_slots)
    if cache.k.shape[1] != B or cache.capacity < P + max_new_tokens + extra_slots:
        raise ValueError(f"cache of {cache.k.shape[1]} rows x {cache.capacity} slots for {B} rows x {P}")
    x = model.embed(batch.prompt_ids, batch.pixel_values, batch.grid_thw)
    pos = model.positions(batch.prompt_ids, batch.grid_thw, valid=batch.prompt_valid)
    cache.length = 0
    cache.key_valid.fill_(True)
    cache.key_valid[:, :P] = batch.prompt_valid
    h = model(x, pos, with_padding(cache, decode_causal(0, P, x.device)), cache=cache, start=0)
    cache.commit(P)
    return Prefilled(cache, pos.amax(dim=(0, 2)) + 1, model.logits(h[:, -1]).float())


def banned_tokens(model: EchoVLM, tokenizer=None) -> torch.Tensor:
    """bool [V] on the model's device: the ids no decoder may sample or commit (issue #14 item 6).

    The diffusion mask token and every special token other than EOS (pad, image and vision
    markers from `model.special`; with a tokenizer also its declared special and added-special
    tokens), plus, with a tokenizer, the LM-head rows past its vocabulary (ids it cannot decode).
    The current `model.special.eos` is never banned.
    """
    V = model.vocab_size
    s = model.special
    ids = {s.mask, s.pad, s.image, s.vision_start, s.vision_end}
    banned = torch.zeros(V, dtype=torch.bool, device=model.device)
    if tokenizer is not None:
        ids |= set(tokenizer.all_special_ids)
        ids |= {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        banned[len(tokenizer) :] = True
    ids.discard(s.eos)
    banned[[i for i in ids if 0 <= i < V]] = True
    return banned


def guard(logits: torch.Tensor, banned: torch.Tensor) -> torch.Tensor:
    """logits [..., V] -> float logits with the banned ids at -inf, before any sampling, confidence
    or recorded distribution (so a banned id gets probability exactly 0)."""
    return logits.float().masked_fill(banned, float("-inf"))


def text_positions(next_pos: torch.Tensor, offset: int, n: int) -> torch.Tensor:
    """M-RoPE ids [3, B, n] for n text tokens starting `offset` after each row's prompt."""
    p = next_pos[:, None] + offset + torch.arange(n, device=next_pos.device)[None]
    return p[None].expand(3, -1, -1)


def sample(
    logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, generator=None
):
    """logits [..., V] -> (tokens [...], probability of each chosen token under the filtered distribution)."""
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
    flat = probs.reshape(-1, probs.shape[-1])
    tok = torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])
    return tok, probs.gather(-1, tok[..., None])[..., 0]
