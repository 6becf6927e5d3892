"""Autoregressive decoding: one token per forward over a static KV cache (the Stage-1 baseline).

Prefill the prompt (images + instruction) once; the first token comes from the prefill's last
logits, each later token from one forward over the previous token. Rows of a batch have ragged
prompt lengths (left padding, hidden by `key_valid`) but share the cache length, so all rows
step together. A finished row keeps emitting EOS until every row is done or max_new_tokens.

The step runs in one of four modes (`TokenStep`): "eager" (attend to the used slots), "static"
(fixed shapes over the whole capacity, see decode/graphs.py), "graph" (static, replayed as a CUDA
graph) and "compile" (static under torch.compile reduce-overhead). They compute the same thing;
tests/test_ar.py checks eager and static against transformers' generate and an uncached loop.
"""

from __future__ import annotations

import time

import torch

from echocxr.decode.common import Output, cut_at_eos, prefill, sample, text_positions
from echocxr.decode.graphs import GraphStep, StaticKV, compiled_step, full_capacity
from echocxr.model.layout import decode_mask
from echocxr.model.vlm import EchoVLM

MODES = ("eager", "static", "graph", "compile")


class TokenStep:
    """step(tok [B], offset) -> logits [B, V]: run the token generated `offset` tokens after each
    row's prompt, writing its KV at the committed length (the engine commits it)."""

    def __init__(self, model: EchoVLM, cache, next_pos: torch.Tensor, mode: str):
        if mode not in MODES:
            raise ValueError(f"unknown step mode {mode!r}; choose one of {MODES}")
        self.model, self.cache, self.next_pos, self.mode = model, cache, next_pos, mode
        self.static_kv = StaticKV(cache)
        self.fast = {"graph": GraphStep, "compile": compiled_step}.get(mode, lambda f: f)(self._static)

    def __call__(self, tok: torch.Tensor, offset: int) -> torch.Tensor:
        cache = self.cache
        pos = text_positions(self.next_pos, offset, 1)  # [3, B, 1]
        mask = decode_mask(cache.key_valid, cache.length, 1)  # [B, 1, 1, length+1]
        if self.mode == "eager":
            return self.model.logits(self.model(self.model.embed(tok[:, None]), pos, mask, cache=cache))[
                :, -1
            ]
        start = torch.tensor([cache.length], device=tok.device)
        return self.fast(tok[:, None], pos, full_capacity(mask, cache.capacity), start)

    def _static(self, ids, pos, mask, start):
        h = self.model(self.model.embed(ids), pos, mask, cache=self.static_kv, start=start)
        return self.model.logits(h)[:, -1]


@torch.no_grad()
def generate(model: EchoVLM, batch, cfg, *, mode: str | None = None) -> Output:
    """mode: see TokenStep; default "graph" on CUDA, "eager" elsewhere."""
    eos = model.special.eos
    t0 = time.perf_counter()
    pre = prefill(model, batch, cfg.max_new_tokens)
    device = pre.last_logits.device
    if device.type == "cuda":  # the prefill's time, for the benchmark's decode-only numbers
        torch.cuda.synchronize(device)
    prefill_s = time.perf_counter() - t0
    mode = mode or ("graph" if device.type == "cuda" else "eager")
    step = TokenStep(model, pre.cache, pre.next_pos, mode)
    gen = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.temperature > 0 else None
    pick = lambda logits: sample(logits, cfg.temperature, cfg.top_k, cfg.top_p, gen)[0]  # noqa: E731
    tok = pick(pre.last_logits)
    out, done, forwards = [tok], tok == eos, 0
    for t in range(1, cfg.max_new_tokens):
        if bool(done.all()):
            break
        logits = step(tok, t - 1)
        pre.cache.commit(1)
        forwards += 1
        tok = torch.where(done, eos, pick(logits))
        out.append(tok)
        done |= tok == eos
    tokens = cut_at_eos(torch.stack(out, 1).cpu(), eos)
    return Output(tokens, forwards, None, {"mode": mode, "steps": len(out), "prefill_s": prefill_s})
