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
(the padding the model was trained on) while other rows continue, so the loop's tensors keep one
shape; the engine runs the forwards on the unfinished rows only (`engine.Run.forward`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from echocxr.model.layout import AR_SHIFT, logits_for_block  # one shift rule for training and decoding

if TYPE_CHECKING:
    from echocxr.decode.engine import Run


def decode(run: Run) -> dict:
    """One denoising forward per block (fused: it also writes the previous block's KV)."""
    B, fused, model = run.cfg.block_size, run.cfg.fused, run.model
    n_blocks = -(-run.n_tokens // B)
    masked = torch.full((run.rows, B), run.mask_id, dtype=torch.long, device=run.device)
    first, prev = run.first, None  # first: logits at the last committed token
    for i in range(n_blocks):
        if fused and prev is not None:  # [block i-1 (clean) | block i (mask)] in one forward
            h = run.forward(torch.cat([prev, masked], 1), (i - 1) * B, B)
            run.cache.commit(B)  # block i-1's KV is now exact
            first, h = model.logits(h[:, B - 1]), h[:, B:]
        else:
            h = run.forward(masked, i * B, B)
        prev = run.commit(run.pick(logits_for_block(model, h, first, AR_SHIFT))[0])
        if not fused:  # write the committed block's KV
            h = run.forward(prev, i * B, B)
            run.cache.commit(B)
            first = model.logits(h[:, -1])
        if run.all_done:
            break
    return {"blocks": i + 1, "fused": fused, "shift": AR_SHIFT}
