"""Pieces every decoder shares: the prefill, padding-aware masks, sampling, the result type.

The prefill, sampling and `cut_at_eos` live in `model.denoise` (Stage 3's teacher rollout uses them
too, and training must not import the decoders); positions and masks in `model.layout`. They are
imported here so that every decoder reads them from one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from echocxr.model.denoise import Prefilled, cut_at_eos, prefill, sample  # noqa: F401 (shared here)
from echocxr.model.kvcache import KVCache
from echocxr.model.layout import attention_mask, text_positions  # noqa: F401 (shared here)


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
