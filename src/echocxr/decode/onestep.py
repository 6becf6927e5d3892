"""One-step block decoding (ECHO Sec. 3.3): every block is denoised in a single forward pass.

Vanilla (`cfg.fused=False`), per block: one forward over the all-mask block (commit every
position at once), then one forward over the committed block that writes its exact KV: 2N
forwards for N blocks.

Fused (`cfg.fused=True`): the forward that denoises block i also carries block i-1 (committed in
the previous step) in front of it, with `masks.decode_block(cached, 2B, B)`: block i-1 attends only
to the cache and itself, so its keys are exactly those of the vanilla commit forward, and block i
sees it as clean context. One forward per block: N forwards, the same FLOPs, half the launches.

Token shift (`train.rad.AR_SHIFT`, the rule RAD trains with): token j is predicted from slot j-1,
so the first token of block i is read from the last hidden state of block i-1, which both the
vanilla commit forward and the fused forward compute; for block 0 it is the prefill's last logits.

A row stops after the block that holds its first EOS; later blocks of that row are filled with EOS
(the padding the model was trained on) while other rows continue, so every row keeps one shape.
"""

from __future__ import annotations

import torch

from echocxr.decode.common import Output, cut_at_eos, prefill, sample, text_positions, with_padding
from echocxr.model.masks import decode_block
from echocxr.model.vlm import EchoVLM
from echocxr.train.rad import AR_SHIFT, logits_for_block  # one shift rule for training and decoding


class BlockForward:
    """One forward over whole blocks placed after the committed slots -> hidden [Bsz, Q, D].

    mode "eager": attend to the used slots only (shapes grow block by block). "static": fixed
    shapes, attention over the whole cache capacity with a mask and KV written by `index_copy_` at
    a position tensor, so one shape per query length. "graph": static, captured once per query
    length as a CUDA graph and replayed (CUDA only; unmeasured, see docs/DCD.md). The three agree.
    """

    def __init__(self, model: EchoVLM, cache, next_pos: torch.Tensor, block: int, mode: str):
        self.model, self.cache, self.next_pos, self.block, self.mode = model, cache, next_pos, block, mode
        self.graphs: dict[int, tuple] = {}

    def __call__(self, ids: torch.Tensor, offset: int) -> torch.Tensor:
        cache, Q = self.cache, ids.shape[1]
        pos = text_positions(self.next_pos, offset, Q)
        mask = with_padding(cache, decode_block(cache.length, Q, self.block, ids.device))
        if self.mode == "eager":
            return self.model(self.model.embed(ids), pos, mask, cache=cache)
        full = torch.zeros(*mask.shape[:3], cache.capacity, dtype=torch.bool, device=ids.device)
        full[..., : mask.shape[-1]] = mask  # slots past the new tokens: stale, never attended
        start = torch.tensor([cache.length], device=ids.device)
        if self.mode == "graph":
            return self._replay(ids, pos, full, start)
        return self._static(ids, pos, full, start)

    def write(self, layer: int, start: torch.Tensor, k_new, v_new, kv_len=None):
        """The cache protocol `EchoVLM.forward` calls, at a position tensor: static shapes."""
        idx = start + torch.arange(k_new.shape[2], device=k_new.device)
        self.cache.k[layer].index_copy_(2, idx, k_new)
        self.cache.v[layer].index_copy_(2, idx, v_new)
        return self.cache.k[layer], self.cache.v[layer]

    def _static(self, ids, pos, mask, start):
        return self.model(self.model.embed(ids), pos, mask, cache=self, start=start)

    def _replay(self, *inputs):
        Q = inputs[0].shape[1]
        if self.graphs.get(Q, 0) is None:  # capture failed before: run the same static step uncaptured
            return self._static(*inputs)
        if Q not in self.graphs:
            bufs = tuple(x.clone() for x in inputs)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up: writes the very KV this step writes anyway
                self._static(*bufs)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    out = self._static(*bufs)
            except RuntimeError as e:  # an op that cannot be captured: say so, stay correct
                print(f"onestep: CUDA graph capture failed ({e}); running the static step uncaptured")
                self.graphs[Q] = None
                return self._static(*inputs)
            self.graphs[Q] = (graph, bufs, out)
        graph, bufs, out = self.graphs[Q]
        for buf, x in zip(bufs, inputs, strict=True):
            buf.copy_(x)
        graph.replay()
        return out  # a static buffer: valid until the next replay


@torch.no_grad()
def generate(model: EchoVLM, batch, cfg, *, mode: str | None = None) -> Output:
    """mode: "eager" | "static" | "graph" (see BlockForward); default: graph on CUDA, else eager."""
    B, eos, mask_id = cfg.block_size, model.special.eos, model.special.mask
    n_blocks = -(-cfg.max_new_tokens // B)
    # extra_slots: in the fused step the mask block sits one block past the committed length
    pre = prefill(model, batch, n_blocks * B, extra_slots=B)
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
        tokens, forwards, None, {"blocks": i + 1, "fused": cfg.fused, "shift": AR_SHIFT, "mode": mode}
    )
