"""Attention masks as pure functions of (query index, key index) -> bool (True = may attend).

Arguments are integer tensors (broadcastable); the result is a bool tensor.

Each rule is written with tensor-friendly operators only, so the same function builds a dense
boolean mask for SDPA (broadcast index tensors) and is a valid FlexAttention `mask_mod`
(`lambda b, h, q, kv: rule(q, kv)`). The brute-force tests in tests/test_masks.py check every
rule against loops written from the paper's description.

Layouts (B = block size, P = prefix length, R = response length, a multiple of B):
- AR / prefill:       [prefix | response]                   causal
- RAD (ECHO, Sec. 3.2): [prefix P | noisy x_t (R) | clean x_0 (R)]
    prefix:        causal among the prefix
    noisy block i: the whole prefix, clean blocks < i, and itself (bidirectional)
    clean block i: the prefix and clean blocks <= i (block-causal)
- Symmetric (ECHO_Base-style baseline, bd3lms layout): [noisy (L) | clean (L)], L = P + R,
    the whole sequence duplicated: noisy block i sees itself and clean blocks < i, clean block i
    sees clean blocks <= i.
"""

from __future__ import annotations

from functools import partial

import torch


def causal(q, k):
    return q >= k


def block_causal(q, k, *, block: int, offset: int = 0):
    """Bidirectional within a block, causal across blocks; blocks counted from `offset`."""
    return (q - offset) // block >= (k - offset) // block


def rad(q, k, *, prefix: int, response: int, block: int):
    """RAD training mask over [prefix | noisy | clean] (see module docstring)."""
    P, R = prefix, response
    q_pre, k_pre = q < P, k < P
    q_noisy = (q >= P) & (q < P + R)
    k_noisy = (k >= P) & (k < P + R)
    q_clean, k_clean = q >= P + R, k >= P + R
    qb_noisy = (q - P) // block  # block index of a noisy query
    qb_clean = (q - P - R) // block
    kb_noisy = (k - P) // block
    kb_clean = (k - P - R) // block
    prefix_rule = q_pre & k_pre & (q >= k)
    noisy_rule = q_noisy & (k_pre | (k_noisy & (kb_noisy == qb_noisy)) | (k_clean & (kb_clean < qb_noisy)))
    clean_rule = q_clean & (k_pre | (k_clean & (kb_clean <= qb_clean)))
    return prefix_rule | noisy_rule | clean_rule


def symmetric(q, k, *, length: int, block: int):
    """bd3lms-style mask over [noisy (length) | clean (length)], the whole sequence duplicated."""
    L = length
    q_noisy, k_noisy = q < L, k < L
    qb = torch.where(q_noisy, q, q - L) // block
    kb = torch.where(k_noisy, k, k - L) // block
    diagonal = q_noisy & k_noisy & (qb == kb)
    offset_block_causal = q_noisy & ~k_noisy & (kb < qb)
    clean_block_causal = ~q_noisy & ~k_noisy & (kb <= qb)
    return diagonal | offset_block_causal | clean_block_causal


def duplicated(q, k, *, prefix: int, response: int, block: int):
    """The full-duplication training baseline over [prefix | noisy x_t | prefix | clean x_0]
    (issue #20's RAD ablation): the whole sequence appears twice, as in earlier AR-to-diffusion
    conversions, with ECHO's rules otherwise. Each prefix copy is causal within itself; noisy block i
    sees the clean copy's prefix, clean blocks < i and itself; clean block i sees the clean prefix
    and clean blocks <= i. Nothing supervised reads the noisy copy of the prefix: this layout costs
    the extra prefix, and `rad` is the same rule without it."""
    P, R = prefix, response
    L = P + R
    q_noisy, k_noisy = q < L, k < L
    qb = torch.where(q_noisy, q, q - L) - P  # offset within the copy's response (negative: prefix)
    kb = torch.where(k_noisy, k, k - L) - P
    same_copy = q_noisy == k_noisy
    prefix_rule = same_copy & (qb < 0) & (kb < 0) & (q >= k)
    q_resp, k_resp = qb >= 0, kb >= 0
    qi, ki = torch.div(qb, block, rounding_mode="floor"), torch.div(kb, block, rounding_mode="floor")
    noisy_rule = (
        q_noisy
        & q_resp
        & ((~k_noisy & ~k_resp) | (k_noisy & k_resp & (ki == qi)) | (~k_noisy & k_resp & (ki < qi)))
    )
    clean_rule = ~q_noisy & q_resp & ~k_noisy & (~k_resp | (ki <= qi))
    return prefix_rule | noisy_rule | clean_rule


def dense(rule, q_len: int, k_len: int, *, q_offset: int = 0, device=None) -> torch.Tensor:
    """Materialize `rule` as a [q_len, k_len] bool tensor; query i has index q_offset + i."""
    q = torch.arange(q_offset, q_offset + q_len, device=device)[:, None]
    k = torch.arange(k_len, device=device)[None, :]
    return torch.as_tensor(rule(q, k), device=device).expand(q_len, k_len)


def flex_block_mask(rule, q_len: int, k_len: int, *, batch: int | None = None, device="cuda"):
    """FlexAttention BlockMask for `rule` (skips fully masked tiles: the source of RAD's speedup)."""
    return block_mask_from_mod(lambda b, h, q, kv: rule(q, kv), q_len, k_len, batch=batch, device=device)


def block_mask_from_mod(mask_mod, q_len: int, k_len: int, *, batch: int | None = None, device="cuda"):
    """The one place that builds a FlexAttention BlockMask: `mask_mod(b, h, q, kv) -> bool`
    (True = attend) over a [q_len, k_len] score matrix; batch None broadcasts over rows."""
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(mask_mod, batch, None, q_len, k_len, device=device)


def rad_rule(prefix: int, response: int, block: int):
    return partial(rad, prefix=prefix, response=response, block=block)


def symmetric_rule(length: int, block: int):
    return partial(symmetric, length=length, block=block)


def duplicated_rule(prefix: int, response: int, block: int):
    return partial(duplicated, prefix=prefix, response=response, block=block)


def prompt_then_blocks(q, k, *, prefix: int, block: int):
    """[prompt P | response] without a cache (the uncached decoding reference): the prompt is
    causal; the response is block-causal in blocks counted from P and sees the whole prompt."""
    in_prompt = (k < prefix) & (q >= k)
    in_response = (k >= prefix) & (q >= prefix) & block_causal(q, k, block=block, offset=prefix)
    return in_prompt | in_response


def decode_rule(cached: int, block: int):
    """Rule of a decoding forward after `cached` committed slots: every new query sees all committed
    slots, and the new tokens see each other block-causally (blocks counted from `cached`).
    block == 1 is the causal AR step (and, with cached == 0, the causal prefill)."""
    return lambda q, k: (k < cached) | block_causal(q, k, block=block, offset=cached)


# Decoding masks. The cache holds `cached` committed positions; the new queries occupy slots
# cached .. cached + q_len - 1 and their keys are appended there (see kvcache.py).


def decode_causal(cached: int, q_len: int, device=None) -> torch.Tensor:
    """AR step / prefill: [q_len, cached + q_len]."""
    return dense(causal, q_len, cached + q_len, q_offset=cached, device=device)


def decode_block(cached: int, q_len: int, block: int, device=None) -> torch.Tensor:
    """Denoise (or commit) q_len new tokens made of whole blocks after `cached` committed slots:
    every new query sees all committed slots, and the new tokens block-causally among themselves.
    With q_len == block this is the noisy block rule; with [prev clean | current noisy] and
    q_len == 2 * block it is the fused one-step rule (the noisy block also sees the clean block
    before it, which RAD's clean-blocks-< i rule allows)."""
    return dense(decode_rule(cached, block), q_len, cached + q_len, q_offset=cached, device=device)
