"""One-step block decoding (ECHO Sec. 3.3): every block is denoised in a single forward pass.

Vanilla (`cfg.fused=False`), per block: one forward over the all-mask block (commit every
position at once), then one forward over the committed block that writes its exact KV: 2N
forwards for N blocks.

Fused (`cfg.fused=True`): the forward that denoises block i also carries block i-1 (committed in
the previous step) in front of it, with `masks.decode_block(cached, 2B, B)`: block i-1 attends only
to the cache and itself, so its keys are exactly those of the vanilla commit forward, and block i
sees it as clean context. One forward per block: N forwards, the same FLOPs, half the launches.

Token shift: the AR-initialised model may predict token j from position j-1 (see `block_logits`).
Then the first token of block i is read from the last hidden state of block i-1, which both the
vanilla commit forward and the fused forward compute; for block 0 it is the prefill's last logits.

A row stops after the block that holds its first EOS; later blocks of that row are filled with EOS
(the padding the model was trained on) while other rows continue, so every row keeps one shape.
"""

from __future__ import annotations

import torch

from echocxr.decode.common import Output, cut_at_eos, prefill, sample, text_positions, with_padding
from echocxr.model.masks import decode_block
from echocxr.model.vlm import EchoVLM

# Whether block logits use the AR token shift (position j-1 predicts token j). Must match the
# RAD/DCD training layout; both choices are implemented and tested here.
AR_SHIFT = True


def block_logits(
    model: EchoVLM, h_block: torch.Tensor, first: torch.Tensor | None, shift: bool
) -> torch.Tensor:
    """Hidden states of a block's B input slots [Bsz, B, D] -> logits for its B tokens [Bsz, B, V].

    shift: token j comes from slot j-1; token 0 from `first` [Bsz, V] (the logits at the last
    committed token before the block). No shift: token j comes from slot j itself.
    """
    if not shift:
        return model.logits(h_block).float()
    return torch.cat([first[:, None].float(), model.logits(h_block[:, :-1]).float()], dim=1)


def _forward(model, cache, next_pos, ids, offset, block):
    """Run ids [Bsz, Q] (whole blocks) at response offset `offset`, writing KV after the committed slots."""
    pos = text_positions(next_pos, offset, ids.shape[1])
    mask = with_padding(cache, decode_block(cache.length, ids.shape[1], block, ids.device))
    return model(model.embed(ids), pos, mask, cache=cache)


@torch.no_grad()
def generate(model: EchoVLM, batch, cfg) -> Output:
    B, eos, mask_id = cfg.block_size, model.special.eos, model.special.mask
    n_blocks = -(-cfg.max_new_tokens // B)
    pre = prefill(
        model, batch, n_blocks * B, extra_slots=B
    )  # fused: the mask block sits past the last commit
    cache, rows = pre.cache, batch.size
    gen = None
    if cfg.temperature > 0:
        gen = torch.Generator(device=pre.last_logits.device).manual_seed(cfg.seed)
    out = torch.full((rows, n_blocks * B), eos, dtype=torch.long, device=pre.last_logits.device)
    done = torch.zeros(rows, dtype=torch.bool, device=out.device)
    first, prev, forwards = pre.last_logits, None, 0  # first: logits at the last committed token
    masked = torch.full((rows, B), mask_id, dtype=torch.long, device=out.device)
    for i in range(n_blocks):
        if cfg.fused and prev is not None:  # [block i-1 (clean) | block i (mask)] in one forward
            h = _forward(model, cache, pre.next_pos, torch.cat([prev, masked], 1), (i - 1) * B, B)
            cache.commit(B)  # block i-1's KV is now exact
            first, h = model.logits(h[:, B - 1]), h[:, B:]
        else:
            h = _forward(model, cache, pre.next_pos, masked, i * B, B)
        forwards += 1
        tokens, _ = sample(
            block_logits(model, h, first, AR_SHIFT), cfg.temperature, cfg.top_k, cfg.top_p, gen
        )
        tokens = torch.where(done[:, None], eos, tokens)
        out[:, i * B : (i + 1) * B] = tokens
        done |= (tokens == eos).any(1)
        if not cfg.fused:  # write the committed block's KV
            h = _forward(model, cache, pre.next_pos, tokens, i * B, B)
            cache.commit(B)
            first, forwards = model.logits(h[:, -1]), forwards + 1
        prev = tokens
        if bool(done.all()):
            break
    tokens = cut_at_eos(out[:, : (i + 1) * B].cpu(), eos)
    tokens = [t[: cfg.max_new_tokens] for t in tokens]
    return Output(tokens, forwards, None, {"blocks": i + 1, "fused": cfg.fused, "shift": AR_SHIFT})
