"""GPU fast path for decode steps: static shapes, then CUDA-graph replay or torch.compile.

A decode step is `fn(*tensors) -> tensor`. To be captured it must have fixed shapes and keep no
Python state that changes between calls, so the step (1) attends to the whole cache capacity
with a mask instead of slicing the used slots and (2) writes its keys/values at a position
*tensor* (`StaticKV.write`, an `index_copy_`), not at a Python int. The slot, positions and mask
are inputs; the committed length stays on the host, in the engine.

`GraphStep` captures one CUDA graph per input shape and replays it; `compiled_step` is the
`torch.compile(mode="reduce-overhead")` alternative (it also uses CUDA graphs underneath). Both
are thin wrappers: the eager step is the same function, and tests check static == eager on CPU.
Neither is used on CPU; their GPU speed is unmeasured in this repo (docs/DECODING.md).
"""

from __future__ import annotations

import torch

from echocxr.model.kvcache import KVCache


class StaticKV:
    """The cache protocol `EchoVLM.forward` calls (`write(layer, start, k, v, kv_len)`) with
    `start` a 1-element long tensor: writes by `index_copy_` and returns the whole buffers."""

    def __init__(self, cache: KVCache):
        self.cache = cache

    def write(self, layer: int, start: torch.Tensor, k_new, v_new, kv_len=None):
        idx = start + torch.arange(k_new.shape[2], device=k_new.device)  # [Q] slots
        self.cache.k[layer].index_copy_(2, idx, k_new)
        self.cache.v[layer].index_copy_(2, idx, v_new)
        return self.cache.k[layer], self.cache.v[layer]


def full_capacity(mask: torch.Tensor, capacity: int) -> torch.Tensor:
    """[B, 1, Q, K] -> [B, 1, Q, capacity]: slots past K (stale or unwritten) are never attended."""
    full = torch.zeros(*mask.shape[:3], capacity, dtype=torch.bool, device=mask.device)
    full[..., : mask.shape[-1]] = mask
    return full


class GraphStep:
    """Replays `fn` as a CUDA graph, one capture per tuple of input shapes.

    Inputs are copied into static buffers before each replay; the output is a static buffer,
    valid until the next call (the caller consumes it before then). The warm-up and capture
    run `fn` for real, so `fn` must be idempotent for the same inputs: a decode step is, since
    it rewrites the same KV slots with the same values. If capture fails (an op that cannot be
    captured), the step runs uncaptured from then on and says so once.
    """

    def __init__(self, fn):
        self.fn = fn
        self.graphs: dict[tuple, tuple | None] = {}

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        key = tuple((tuple(x.shape), x.dtype) for x in inputs)
        if key in self.graphs and self.graphs[key] is None:
            return self.fn(*inputs)
        if key not in self.graphs:
            self.graphs[key] = self._capture(inputs)
            if self.graphs[key] is None:
                return self.fn(*inputs)
        graph, bufs, out = self.graphs[key]
        for buf, x in zip(bufs, inputs, strict=True):
            buf.copy_(x)
        graph.replay()
        return out

    def _capture(self, inputs):
        bufs = tuple(x.clone() for x in inputs)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graphs advises
            for _ in range(2):
                self.fn(*bufs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                out = self.fn(*bufs)
        except RuntimeError as e:
            print(f"graphs: CUDA graph capture failed ({e}); running the step uncaptured")
            return None
        return graph, bufs, out


def compiled_step(fn):
    """torch.compile with CUDA graphs; dynamic=False since every input keeps one shape."""
    return torch.compile(fn, mode="reduce-overhead", dynamic=False)
