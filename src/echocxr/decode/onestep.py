"""One-step block decoding (ECHO Sec. 3.3): every block is denoised in a single forward pass.

Vanilla (`cfg.fused=False`), per block: one forward over the all-mask block (commit every
position at once), then one forward over the committed block that writes its exact KV: 2N
forwards for N blocks.

Fused (`cfg.fused=True`): the forward that denoises block i also carries block i-1 (committed in
the previous step) in front of it, with `masks.decode_block(cached, 2B, B)`: block i-1 attends only
to the cache and itself, so its keys are exactly those of the vanilla commit forward, and block i
sees it as clean context. One forward per block: N forwards, the same FLOPs, half the launches.

Token shift (`model.layout.AR_SHIFT`, the rule RAD trains with): token j is predicted from slot j-1,
so the first token of block i is read from the last hidden state of block i-1, which both the
vanilla commit forward and the fused forward compute; for block 0 it is the prefill's last logits.

A row stops after the block that holds its first EOS; later blocks of that row are filled with EOS
(the padding the model was trained on) while other rows continue, so every row keeps one shape.
"""

from __future__ import annotations

import time

import torch

from echocxr.decode.common import Output, cut_at_eos, prefill, sample, text_positions
from echocxr.decode.graphs import GraphStep, StaticKV, compiled_step, full_capacity
from echocxr.model.layout import AR_SHIFT, decode_mask, logits_for_block  # one shift rule for all
from echocxr.model.vlm import EchoVLM


class BlockForward:
    """One forward over whole blocks placed after the committed slots -> hidden [Bsz, Q, D].

    mode "eager": attend to the used slots only (shapes grow block by block). "static": fixed
    shapes, attention over the whole cache capacity with a mask and KV written at a position
    tensor (`decode.graphs.StaticKV`), one shape per query length. "graph": the static step
    replayed as a CUDA graph (`graphs.GraphStep`), "compile": the static step under
    `torch.compile(mode="reduce-overhead")` (CUDA only, unmeasured; see docs/DCD.md). All agree.
    """

    MODES = ("eager", "static", "graph", "compile")

    def __init__(self, model: EchoVLM, cache, next_pos: torch.Tensor, block: int, mode: str):
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, not {mode!r}")
        self.model, self.cache, self.next_pos, self.block, self.mode = model, cache, next_pos, block, mode
        self.static_kv = StaticKV(cache)
        self.step = {"static": self._static, "graph": GraphStep(self._static)}.get(mode)
        if mode == "compile":
            self.step = compiled_step(self._static)

    def __call__(self, ids: torch.Tensor, offset: int) -> torch.Tensor:
        cache, Q = self.cache, ids.shape[1]
        pos = text_positions(self.next_pos, offset, Q)
        mask = decode_mask(cache.key_valid, cache.length, Q, self.block)
        if self.mode == "eager":
            return self.model(self.model.embed(ids), pos, mask, cache=cache)
        start = torch.tensor([cache.length], device=ids.device)
        return self.step(ids, pos, full_capacity(mask, cache.capacity), start)

    def _static(self, ids, pos, mask, start):
        return self.model(self.model.embed(ids), pos, mask, cache=self.static_kv, start=start)


@torch.no_grad()
def generate(model: EchoVLM, batch, cfg, *, mode: str | None = None) -> Output:
    """mode: see BlockForward; default: graph on CUDA, else eager."""
    B, eos, mask_id = cfg.block_size, model.special.eos, model.special.mask
    n_blocks = -(-cfg.max_new_tokens // B)
    # extra_slots: in the fused step the mask block sits one block past the committed length
    t0 = time.perf_counter()
    pre = prefill(model, batch, n_blocks * B, extra_slots=B)
    if pre.last_logits.is_cuda:  # the prefill time is reported (bench decode): wait for the GPU
        torch.cuda.synchronize(pre.last_logits.device)
    prefill_s = time.perf_counter() - t0
    cache, rows = pre.cache, batch.size
    mode = mode or ("graph" if pre.last_logits.is_cuda else "eager")
    forward = BlockForward(model, cache, pre.next_pos, B, mode)
    gen = None
    if cfg.temperature > 0:
        gen = torch.Generator(device=pre.last_logits.device).manual_seed(cfg.seed)
    out = torch.full((rows, n_blocks * B), eos, dtype=torch.long, device=pre.last_logits.device)
    done = torch.zeros(rows, dtype=torch.bool, device=out.device)
    first, prev, forwards = pre.last_logits, None, 0  # first: logits at the last committed token
    masked = torch.full((rows, B), mask_id, dtype=torch.long, device=out.device)
    for i in range(n_blocks):
        if cfg.fused and prev is not None:  # [block i-1 (clean) | block i (mask)] in one forward
            h = forward(torch.cat([prev, masked], 1), (i - 1) * B)
            cache.commit(B)  # block i-1's KV is now exact
            first, h = model.logits(h[:, B - 1]), h[:, B:]
        else:
            h = forward(masked, i * B)
        forwards += 1
        tokens, _ = sample(
            logits_for_block(model, h, first, AR_SHIFT), cfg.temperature, cfg.top_k, cfg.top_p, gen
        )
        tokens = torch.where(done[:, None], eos, tokens)
        out[:, i * B : (i + 1) * B] = tokens
        done |= (tokens == eos).any(1)
        if not cfg.fused:  # write the committed block's KV
            h = forward(tokens, i * B)
            cache.commit(B)
            first, forwards = model.logits(h[:, -1]), forwards + 1
        prev = tokens
        if bool(done.all()):
            break
    tokens = cut_at_eos(out[:, : (i + 1) * B].cpu(), eos)
    tokens = [t[: cfg.max_new_tokens] for t in tokens]
    return Output(
        tokens,
        forwards,
        None,
        {"blocks": i + 1, "fused": cfg.fused, "shift": AR_SHIFT, "mode": mode, "prefill_s": prefill_s},
    )
