"""Stage 3: DCD (Direct Conditional Distillation), ECHO Sec. 3.3 ("Stage 3"), and its ablations.

A one-step decoder predicts every position of a block independently from one forward (mean-field),
which degrades text. DCD distils the multi-step teacher's confidence-ordered trajectory into it:

Phase 1 (trajectories). The teacher (a RAD checkpoint) decodes distillation studies block by block
with `decode.block` (confidence-ordered unmasking, `record_trajectory=True`). For every response
position we keep the token it committed, the step s (0..K-1) at which it was committed, and the
teacher's distribution at that step as top-k probabilities plus the residual mass r outside them.
Rollouts that fall into a repetition loop are discarded (`repetition_loop`).

Phase 2 (alignment). The student sees, in the RAD layout [prefix | all-mask blocks | clean teacher
tokens], every block fully masked and conditioned on the teacher's committed blocks before it, so all
blocks of a rollout train in one forward. Per position j with teacher target p_j (top-k + rest):

    L = sum_j w_j KL(p_j || q_j) / sum_j w_j  +  lambda_eos * mean_{j: y_j = EOS} -log q_j(EOS)
    w_j = 1 + alpha * s_j / (K - 1)      (later commits carry more mean-field bias)

KL over k + 1 buckets: the teacher's top-k tokens and one "rest" bucket (the student's mass outside
the teacher's top-k). That coarsening can only lower the KL (data-processing inequality); docs/DCD.md
gives the measured gap for k = 8, 32, 64.

Ablations: `kl="reverse"` (KL(q || p) on the same buckets), `step_weight=False` (w_j = 1),
`eos_loss=False`, `objective="onestep-ft"` (cross-entropy of the one-step student on ground-truth
reports, no teacher).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from echocxr.model.masks import dense, rad_rule
from echocxr.model.vlm import EchoVLM

OBJECTIVES = ("dcd", "onestep-ft")
KL_DIRECTIONS = ("forward", "reverse")
REFRESH = ("teacher", "student")
NO_TARGET = -1  # step value of a position without a teacher distribution (EOS padding past the rollout)


# -- targets -------------------------------------------------------------------------------------


@dataclass
class Targets:
    """Teacher targets for a batch of rollouts, aligned with the response [B, R]."""

    tokens: torch.Tensor  # [B, R] teacher's committed tokens (EOS-padded to whole blocks)
    step: torch.Tensor  # [B, R] long, unmask step 0..K-1 within the block; NO_TARGET where none
    top_idx: torch.Tensor  # [B, R, k] long
    top_p: torch.Tensor  # [B, R, k] teacher probabilities of those tokens
    rest: torch.Tensor  # [B, R] teacher mass outside its top-k
    steps: int  # K: denoising steps per block the teacher ran


def topk_target(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full distributions [..., V] -> (top-k indices, their probabilities, residual mass)."""
    V = probs.shape[-1]
    p, idx = probs.float().topk(min(k, V), dim=-1)
    rest = (1.0 - p.sum(-1)).clamp_min(0.0)
    return idx, p, rest if k < V else torch.zeros_like(rest)  # k >= V: the rest is rounding error


# -- the loss (paper: Stage 3, Phase 2) -------------------------------------------------------------


def bucket_log_probs(logits: torch.Tensor, top_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Student logits [N, V] -> (log q on the teacher's top-k [N, k], log q of the rest bucket [N])."""
    logits = logits.float()
    log_z = logits.logsumexp(-1)
    log_top = logits.gather(-1, top_idx) - log_z[:, None]
    # exact log of the mass outside the top-k, without 1 - sum(q) cancellation; a huge negative
    # fill rather than -inf keeps the gradient finite when the top-k covers the whole vocabulary
    log_rest = logits.scatter(-1, top_idx, -1e30).logsumexp(-1) - log_z
    return log_top, log_rest


def kl_topk(
    logits: torch.Tensor,
    top_idx: torch.Tensor,
    top_p: torch.Tensor,
    rest: torch.Tensor,
    direction: str = "forward",
    floor: float = 1e-30,
) -> torch.Tensor:
    """KL between the teacher's (top-k + rest) distribution p and the student's q on the same k + 1
    buckets, per position [N]. forward: KL(p || q); reverse: KL(q || p), where teacher
    probabilities are floored at `floor` (a rest that is exactly 0 would make it infinite)."""
    log_q, log_q_rest = bucket_log_probs(logits, top_idx)
    p = torch.cat([top_p.float(), rest.float()[:, None]], -1)  # [N, k + 1]
    log_q = torch.cat([log_q, log_q_rest[:, None]], -1)
    if direction == "forward":
        return torch.where(p > 0, p * (p.clamp_min(floor).log() - log_q), 0.0).sum(-1)
    if direction == "reverse":
        q = log_q.exp()
        return (q * (log_q - p.clamp_min(floor).log())).sum(-1)
    raise ValueError(f"unknown KL direction {direction!r}")


def step_weights(step: torch.Tensor, steps: int, alpha: float) -> torch.Tensor:
    """w = 1 + alpha * s / (K - 1): the last-committed positions weigh 1 + alpha, the first 1."""
    if steps <= 1 or alpha == 0:
        return torch.ones_like(step, dtype=torch.float32)
    return 1.0 + alpha * step.clamp_min(0).float() / (steps - 1)


def dcd_loss(
    logits: torch.Tensor,
    targets: Targets,
    eos: int,
    *,
    kl: str = "forward",
    alpha: float = 1.0,
    eos_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Student block-position logits [B, R, V] against teacher targets (module docstring)."""
    V = logits.shape[-1]
    flat = logits.reshape(-1, V)
    step = targets.step.reshape(-1)
    has = step != NO_TARGET
    k = targets.top_idx.shape[-1]
    div = kl_topk(
        flat[has],
        targets.top_idx.reshape(-1, k)[has],
        targets.top_p.reshape(-1, k)[has],
        targets.rest.reshape(-1)[has],
        kl,
    )
    w = step_weights(step[has], targets.steps, alpha)
    loss_kl = (w * div).sum() / w.sum().clamp_min(1e-8)
    is_eos = targets.tokens.reshape(-1) == eos
    loss_eos = (
        F.cross_entropy(flat[is_eos].float(), targets.tokens.reshape(-1)[is_eos])
        if is_eos.any()
        else flat.sum() * 0
    )
    loss = loss_kl + eos_weight * loss_eos
    logs = {
        "kl": float(loss_kl),
        "eos_ce": float(loss_eos),
        "kl_unweighted": float(div.mean()) if has.any() else 0.0,
    }
    return loss, logs


# -- the student in the RAD layout ---------------------------------------------------------------------


def response_logit_index(prefix: int, response: int, block: int, shift: bool) -> torch.Tensor:
    """For each response position t, the slot of [prefix | noisy | clean] whose hidden state
    predicts it [R]. Without shift: the noisy copy of t. With the AR shift: the noisy slot t-1 inside
    a block, and for a block's first token the last clean token before it (the prompt's last token
    for block 0), exactly what the one-step decoder reads (decode/onestep.py)."""
    t = torch.arange(response)
    if not shift:
        return prefix + t
    first = t % block == 0
    before = torch.where(t == 0, prefix - 1, prefix + response + t - 1)
    return torch.where(first, before, prefix + t - 1)


def rad_student_logits(model: EchoVLM, batch, clean: torch.Tensor, block: int, shift: bool) -> torch.Tensor:
    """One forward over [prefix | all-mask blocks | clean] (RAD layout, masks.rad): logits for every
    response position [B, R, V], each block predicted fully masked given the clean blocks before it."""
    from echocxr.decode.common import text_positions

    B, P = batch.prompt_ids.shape
    R = clean.shape[1]
    noisy = torch.full_like(clean, model.special.mask)
    x = torch.cat(
        [
            model.embed(batch.prompt_ids, batch.pixel_values, batch.grid_thw),
            model.embed(noisy),
            model.embed(clean),
        ],
        1,
    )
    prompt_pos = model.positions(batch.prompt_ids, batch.grid_thw, valid=batch.prompt_valid)
    resp_pos = text_positions(
        prompt_pos.amax(dim=(0, 2)) + 1, 0, R
    )  # the noisy copy shares the clean positions
    pos = torch.cat([prompt_pos, resp_pos, resp_pos], 2)
    S = P + 2 * R
    valid = torch.cat([batch.prompt_valid, torch.ones(B, 2 * R, dtype=torch.bool, device=clean.device)], 1)
    own = torch.eye(S, dtype=torch.bool, device=clean.device)  # padded queries keep a key (no NaN rows)
    mask = (dense(rad_rule(P, R, block), S, S, device=clean.device)[None] & valid[:, None, :]) | own
    h = model(x, pos, mask[:, None])
    return model.logits(h[:, response_logit_index(P, R, block, shift).to(clean.device)])


# -- repetition loops (Phase 1 filter) -----------------------------------------------------------------


def repetition_loop(tokens: list[int], max_n: int = 8, min_repeats: int = 3, min_span: int = 12) -> bool:
    """True if some n-gram (n <= max_n) repeats back to back at least `min_repeats` times over at
    least `min_span` tokens, e.g. "no effusion. no effusion. no effusion." A short stutter such as
    a doubled word does not count."""
    T = len(tokens)
    for n in range(1, max_n + 1):
        need = max(min_repeats, -(-min_span // n))  # repeats of the n-gram to flag
        run = 0  # tokens so far that equal the token n positions earlier
        for i in range(n, T):
            run = run + 1 if tokens[i] == tokens[i - n] else 0
            if run >= (need - 1) * n:
                return True
    return False
