"""The ECHO sequence layout: how a study becomes model inputs, one floor below every stage.

Training (AR, RAD, DCD), the decoders, the evaluation and the benchmarks all build their inputs
here, so the rules they share are written once:

- **Token shift** (`AR_SHIFT`). The Stage-1 AR head predicts token j from the hidden state at slot
  j-1, and the block-diffusion stages keep that head: token j of a block is read from slot j-1 of
  the same block, and the block's first token from the last clean (committed) token before it (the
  prompt's last token for block 0). `response_logit_index` (training) and `logits_for_block`
  (decoding) are the two readings of that rule. The shift is saved in every checkpoint's
  echocxr.json (`SHIFT_KEY`) and checked when the checkpoint is loaded (`check_checkpoint`): code
  that reads logits by one rule cannot decode a checkpoint trained by the other.
- **Positions** (M-RoPE). The prompt (images + instruction) takes Qwen2.5-VL's 3D positions; the
  response continues as text from the prompt's largest position. In RAD's layout the noisy copy of
  the response shares the clean copy's positions (ECHO Sec. 3.2).
- **Masks**. One padding-aware builder (`attention_mask`) turns a rule of `model.masks` into a
  dense SDPA mask or a FlexAttention `BlockMask`, hiding left-padded prompt slots as keys.

Layouts: AR [prompt P | response R] causal; RAD [prompt P | noisy x_t (R) | clean x_0 (R)]
(`masks.rad`); decoding: [committed cache | new blocks] (`masks.decode_rule`).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from echocxr.errors import UserError
from echocxr.model import masks

# Predict token j from position j-1 (True) or from position j itself (False). One value for RAD
# training, the block and one-step decoders and DCD; saved in and checked against checkpoints.
AR_SHIFT = True
SHIFT_KEY = "token_shift"  # its field in echocxr.json


# -- the token shift, saved and read back ---------------------------------------------------------


def checkpoint_fields() -> dict:
    """Fields every checkpoint's echocxr.json carries about the layout it was trained with."""
    return {SHIFT_KEY: AR_SHIFT}


def check_checkpoint(meta: dict, where: str | Path) -> None:
    """Raise UserError unless echocxr.json `meta` of checkpoint `where` records the token shift this
    code reads logits with. A checkpoint without the field (written before it existed, or by hand)
    is refused rather than guessed: its logits might be read one slot off. The message says which
    field to add with which value (`echocxr train` has trained every stage with the shift since
    2026-11-22 and records it since 2026-11-30)."""
    if SHIFT_KEY not in meta:
        raise UserError(
            f"{where}/echocxr.json: no {SHIFT_KEY!r} field, so the token shift it was trained with is "
            f"unknown (checkpoints written before 2026-11-30 lack it). If `echocxr train` wrote it on or "
            f'after 2026-11-22, add "{SHIFT_KEY}": {str(AR_SHIFT).lower()} to that file (every stage '
            "reads token j from slot j-1 since then); it is not guessed because a checkpoint trained "
            "without the shift would decode one slot off, silently"
        )
    if meta[SHIFT_KEY] is not AR_SHIFT:
        raise UserError(
            f"{where}/echocxr.json: trained with {SHIFT_KEY}={meta[SHIFT_KEY]!r}, but this code reads "
            f"logits with {SHIFT_KEY}={AR_SHIFT}; it cannot decode or train it correctly"
        )


def response_logit_index(prefix: int, response: int, block: int, shift: bool = AR_SHIFT) -> torch.Tensor:
    """For each response position t of [prefix | noisy | clean], the slot whose hidden state
    predicts x0_t [R]: the noisy copy of t (no shift), or with the shift the noisy slot t-1 inside
    a block and, for a block's first token, the clean slot t-1 (slot prefix-1 for t = 0)."""
    t = torch.arange(response)
    if not shift:
        return prefix + t
    before = torch.where(t == 0, prefix - 1, prefix + response + t - 1)
    return torch.where(t % block == 0, before, prefix + t - 1)


def logits_for_block(model, h_block: torch.Tensor, first: torch.Tensor | None, shift: bool = AR_SHIFT):
    """Hidden states of a block's B slots [rows, B, D] -> logits for its B tokens [rows, B, V] fp32.

    shift: token j from slot j-1, token 0 from `first` [rows, V] (the logits at the last committed
    token before the block). No shift: token j from slot j.
    """
    if not shift:
        return model.logits(h_block).float()
    return torch.cat([first[:, None].float(), model.logits(h_block[:, :-1]).float()], dim=1)


# -- positions and embeddings ---------------------------------------------------------------------


def text_positions(next_pos: torch.Tensor, offset: int, n: int) -> torch.Tensor:
    """M-RoPE ids [3, rows, n] for n text tokens starting `offset` after each row's prompt, whose
    first free position is next_pos [rows] (all three axes equal for text)."""
    p = next_pos[:, None] + offset + torch.arange(n, device=next_pos.device)[None]
    return p[None].expand(3, -1, -1)


def response_positions(pos_prompt: torch.Tensor, length: int) -> torch.Tensor:
    """Text positions [3, rows, length] continuing each row's prompt positions [3, rows, P]."""
    return text_positions(pos_prompt.amax(dim=(0, 2)) + 1, 0, length)


def prompt_inputs(model, batch, *, freeze_vision: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Embedded prompt [rows, P, D] (image features scattered into their slots) and its M-RoPE
    positions [3, rows, P]. With a frozen vision tower the image features are computed without
    keeping activations for backward."""
    if batch.pixel_values is not None and freeze_vision:
        with torch.no_grad():
            feats = model.encode_images(batch.pixel_values, batch.grid_thw)
        x = model.embed(batch.prompt_ids, image_features=feats)
    else:
        x = model.embed(batch.prompt_ids, batch.pixel_values, batch.grid_thw)
    pos = model.positions(batch.prompt_ids, batch.grid_thw, valid=batch.prompt_valid)
    return x, pos


# -- the one mask builder ---------------------------------------------------------------------------


def attention_mask(rule, key_valid: torch.Tensor, q_len: int | None = None, *, flex: bool = False):
    """A rule of `model.masks` combined with key validity: dense [rows, 1, Q, K] bool (SDPA) or,
    with flex, a FlexAttention BlockMask over [rows, Q, K].

    rule: callable (q, k) -> bool on absolute slot indices, or (dense only) an already evaluated
    [Q, K] bool tensor. key_valid [rows, K]: False hides a (padded) key slot. The Q queries occupy
    the last Q key slots (K - Q .. K - 1): the whole sequence in training, the new tokens after the
    cache in decoding. Each query keeps its own slot visible so a padded row never has an empty
    softmax (its output is never read).
    """
    rows, K = key_valid.shape
    Q = K if q_len is None else q_len
    first = K - Q
    if flex:
        if not callable(rule):
            raise TypeError("a FlexAttention mask needs the rule as a function, not a tensor")

        def mask_mod(b, h, q, k):
            qa = q + first
            return (rule(qa, k) & key_valid[b, k]) | (qa == k)

        return masks.block_mask_from_mod(mask_mod, Q, K, batch=rows, device=key_valid.device)
    q = torch.arange(first, K, device=key_valid.device)[:, None]
    k = torch.arange(K, device=key_valid.device)[None, :]
    allowed = torch.as_tensor(rule(q, k) if callable(rule) else rule, device=key_valid.device)
    return ((allowed.expand(Q, K)[None] & key_valid[:, None, :]) | (q == k))[:, None]


def decode_mask(key_valid: torch.Tensor, cached: int, q_len: int, block: int = 1) -> torch.Tensor:
    """Dense mask [rows, 1, q_len, cached + q_len] of a decoding forward: q_len new tokens (whole
    blocks of `block`; 1 = the AR step) after `cached` committed cache slots; key_valid is the
    cache's [rows, capacity] validity (`KVCache.key_valid`)."""
    return attention_mask(masks.decode_rule(cached, block), key_valid[:, : cached + q_len], q_len)


# -- whole layouts ----------------------------------------------------------------------------------


def ar_inputs(model, batch, *, freeze_vision: bool = False, flex: bool = False):
    """Stage 1 (ECHO_AR): [prompt | response] causal. Returns embeddings [rows, P + R, D],
    positions [3, rows, P + R] and the mask (dense or BlockMask). Response token j is read from
    slot P + j - 1 (the shift)."""
    rows, R = batch.response_ids.shape
    x_prompt, pos_prompt = prompt_inputs(model, batch, freeze_vision=freeze_vision)
    x = torch.cat([x_prompt, model.embed(batch.response_ids)], 1)
    pos = torch.cat([pos_prompt, response_positions(pos_prompt, R)], 2)
    ones = torch.ones(rows, R, dtype=torch.bool, device=x.device)
    return x, pos, attention_mask(masks.causal, torch.cat([batch.prompt_valid, ones], 1), flex=flex)


def rad_inputs(model, batch, x_t: torch.Tensor, *, freeze_vision: bool, block: int, flex: bool = False):
    """Stage 2 (ECHO Sec. 3.2): [prompt P | noisy x_t (R) | clean x_0 (R)] with x_0 =
    batch.response_ids and x_t [rows, R]. Returns embeddings [rows, S, D], positions [3, rows, S]
    (the noisy copy shares the clean copy's) and the `masks.rad` mask, dense [rows, 1, S, S] or a
    BlockMask with flex; S = P + 2R."""
    x0 = batch.response_ids
    rows, P = batch.prompt_ids.shape
    R = x0.shape[1]
    x_prompt, pos_prompt = prompt_inputs(model, batch, freeze_vision=freeze_vision)
    x = torch.cat([x_prompt, model.embed(x_t), model.embed(x0)], 1)
    resp = response_positions(pos_prompt, R)
    pos = torch.cat([pos_prompt, resp, resp], 2)
    valid = torch.cat([batch.prompt_valid, torch.ones(rows, 2 * R, dtype=torch.bool, device=x0.device)], 1)
    return x, pos, attention_mask(masks.rad_rule(P, R, block), valid, flex=flex)


LAYOUTS = ("rad", "duplicated")  # Stage 2's training layouts: ECHO's RAD and the full-duplication ablation


def duplicated_inputs(
    model, batch, x_t: torch.Tensor, *, freeze_vision: bool, block: int, flex: bool = False
):
    """The full-duplication ablation of Stage 2 (issue #20): [prompt | x_t | prompt | x_0], S =
    2(P + R), under `masks.duplicated` (the vision features are computed once and placed in both
    prompt copies; the language model runs over both). Returns embeddings, positions (each copy
    its own prompt's and the response's) and the mask, like `rad_inputs`."""
    x0 = batch.response_ids
    rows, P = batch.prompt_ids.shape
    R = x0.shape[1]
    x_prompt, pos_prompt = prompt_inputs(model, batch, freeze_vision=freeze_vision)
    x = torch.cat([x_prompt, model.embed(x_t), x_prompt, model.embed(x0)], 1)
    resp = response_positions(pos_prompt, R)
    pos = torch.cat([pos_prompt, resp, pos_prompt, resp], 2)
    ones = torch.ones(rows, R, dtype=torch.bool, device=x0.device)
    valid = torch.cat([batch.prompt_valid, ones, batch.prompt_valid, ones], 1)
    return x, pos, attention_mask(masks.duplicated_rule(P, R, block), valid, flex=flex)


def duplicated_logit_index(prefix: int, response: int, block: int, shift: bool = AR_SHIFT) -> torch.Tensor:
    """`response_logit_index` for the duplicated layout [R]: the same slots, moved to where they
    sit in [prompt | noisy | prompt | clean] (the clean copy's prompt and response follow the
    noisy response)."""
    idx = response_logit_index(prefix, response, block, shift)
    L = prefix + response
    return torch.where(idx < prefix, idx + L, torch.where(idx < L, idx, idx + prefix))


def rad_student_logits(
    model,
    batch,
    clean: torch.Tensor,
    block: int,
    shift: bool = AR_SHIFT,
    noisy: torch.Tensor | None = None,
    *,
    flex: bool = False,
) -> torch.Tensor:
    """One forward over RAD's layout with clean [rows, R] as x_0 (vision tower frozen): logits
    [rows, R, V] for every response position. noisy defaults to all-mask blocks, so each block is
    predicted fully masked given the clean blocks before it: the one-step decoder's view of that
    block (DCD's student, Sec. 3.3, and the evaluation's EOS confidence)."""
    if noisy is None:
        noisy = torch.full_like(clean, model.special.mask)
    P, R = batch.prompt_ids.shape[1], clean.shape[1]
    x, pos, mask = rad_inputs(
        model, replace(batch, response_ids=clean), noisy, freeze_vision=True, block=block, flex=flex
    )
    h = model(x, pos, mask)
    return model.logits(h[:, response_logit_index(P, R, block, shift).to(clean.device)])


def uncached_inputs(model, batch, x_prompt, pos_prompt, response: torch.Tensor, block: int):
    """The uncached decoding reference's forward over [prompt | response so far] with response
    [rows, n] (committed blocks, then the block being denoised): embeddings, positions and the
    `masks.prompt_then_blocks` mask, from the prompt's embeddings and positions."""
    P = x_prompt.shape[1]
    x = torch.cat([x_prompt, model.embed(response)], 1)
    pos = torch.cat([pos_prompt, response_positions(pos_prompt, response.shape[1])], 2)
    valid = torch.cat([batch.prompt_valid, torch.ones_like(response, dtype=torch.bool)], 1)
    rule = lambda q, k: masks.prompt_then_blocks(q, k, prefix=P, block=block)  # noqa: E731
    return x, pos, attention_mask(rule, valid)
