"""Pieces every decoder shares: the result type, and (re-exported so decoders read them from one
place) the prefill, the decoding guard and sampling with one generator per row from
`model.denoise` (Stage 3's teacher rollout uses them too, and training must not import the
decoders), positions and masks from `model.layout`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from echocxr.model.denoise import (  # noqa: F401 (shared here)
    SEED_MAX,
    SEED_MIN,
    Prefilled,
    banned_tokens,
    cut_at_eos,
    guard,
    prefill,
    row_generators,
    sample,
)
from echocxr.model.kvcache import KVCache
from echocxr.model.layout import attention_mask, decode_mask, text_positions  # noqa: F401 (shared here)


@dataclass
class Output:
    tokens: list[list[int]]  # generated ids per row, up to and including the first EOS
    forwards: int  # model forward passes after the prefill
    trajectory: list | None = None  # block decoders: per block and step, what was committed
    stats: dict = field(default_factory=dict)


def with_padding(cache: KVCache, rule_mask: torch.Tensor) -> torch.Tensor:
    """[Q, K] evaluated rule mask -> [B, 1, Q, K] that also hides padded key slots
    (`layout.attention_mask`; the queries are the last Q of the K slots)."""
    Q, K = rule_mask.shape
    return attention_mask(rule_mask, cache.key_valid[:, :K], Q)


def allocate_cache(model, rows: int, capacity: int) -> KVCache:
    """Empty KV buffers [L, rows, H_kv, capacity, D] in the model's dtype, on its device."""
    shape = (model.n_layers, rows, model.n_kv_heads, model.head_dim)
    return KVCache.allocate(*shape, capacity, dtype=model.dtype, device=model.device)
