"""A plain KV cache: fixed-size buffers and an explicit committed length.

Only the decoding engine advances `length`. A forward pass writes the keys/values of its new
tokens at slots `start .. start + q_len - 1` (by default `start = length`) and attends to slots
`0 .. start + q_len - 1`; writing past `length` without committing is how a block is denoised
and later overwritten. Prompts in a batch are left-padded to one length, so every row shares
`length`; `key_valid` marks the padding slots that no query may attend to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KVCache:
    k: torch.Tensor  # [L, B, H_kv, T, D]
    v: torch.Tensor  # [L, B, H_kv, T, D]
    key_valid: torch.Tensor  # [B, T] bool
    length: int = 0

    @classmethod
    def allocate(cls, n_layers, batch, n_kv_heads, head_dim, max_len, *, dtype, device) -> KVCache:
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        return cls(
            k=torch.zeros(shape, dtype=dtype, device=device),
            v=torch.zeros(shape, dtype=dtype, device=device),
            key_valid=torch.ones(batch, max_len, dtype=torch.bool, device=device),
        )

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def write(
        self, layer: int, start: int, k_new: torch.Tensor, v_new: torch.Tensor, kv_len: int | None = None
    ):
        """Store k/v [B, H_kv, Q, D] at slots start.. and return the first `kv_len` slots (default start+Q)."""
        end = start + k_new.shape[2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache overflow: need {end} slots, have {self.capacity}")
        self.k[layer, :, :, start:end] = k_new
        self.v[layer, :, :, start:end] = v_new
        n = end if kv_len is None else kv_len
        return self.k[layer, :, :, :n], self.v[layer, :, :, :n]

    def commit(self, n: int) -> None:
        self.length += n
        if self.length > self.capacity:
            raise RuntimeError("KV cache committed past its capacity")
