"""Stage 2: RAD (Response-Asymmetric Diffusion), ECHO Sec. 3.2 ("Stage 2").

Converts the Stage-1 AR model into a block-diffusion model. One training sequence is

    [prefix P (vision + instruction) | noisy response x_t (R) | clean response x_0 (R)]

Only the response is duplicated; the long vision prefix appears once (the symmetric baseline of
earlier AR-to-diffusion conversions duplicates it too, `masks.symmetric`). Attention is
`masks.rad`: prefix causal; noisy block i sees the prefix, the clean blocks before i and itself
(bidirectionally); clean block i sees the prefix and the clean blocks up to i. The noisy copy uses
the clean copy's positions (M-RoPE ids). Left-padded prompt slots are hidden as keys.

Noise and objective (the masked-diffusion NELBO, discretised per block). For every block b of
every row, draw the number of masked tokens n_b ~ Uniform{1, ..., B}, so the mask ratio is
t_b = n_b / B, and mask n_b positions of the block chosen uniformly at random. Then

    L = 1 / (rows * R) * sum_rows sum_b (1 / t_b) * sum_{j in block b, masked} -log p(x0_j | x_t, x0_<b, prefix)

Every response position, EOS padding included, is a target when masked: the responses are
right-padded with EOS to a multiple of B (`collate(..., multiple_of=B)`), so the model learns where
a report ends and that EOS follows EOS.

Token shift (`AR_SHIFT`, shared with every decoder and with DCD): the AR model predicts token j
from position j-1, so the converted model keeps that head. Token j of a block is read from the
hidden state at slot j-1 of the same (noisy) block, and the block's first token from the slot of
the last clean token before it (the prompt's last token for block 0). Those slots see exactly what
the RAD mask allows for block b (prefix, clean blocks < b, the noisy block itself), so training and
decoding read the same slots (`response_logit_index`, `logits_for_block`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from echocxr.model.masks import rad_rule
from echocxr.model.vlm import EchoVLM
from echocxr.train.inputs import prompt_prefix, response_positions

# Predict token j from position j-1 (True) or from position j itself (False). One value for
# RAD training, the block and one-step decoders and DCD.
AR_SHIFT = True


def logits_for_block(
    model: EchoVLM, h_block: torch.Tensor, first: torch.Tensor | None, shift: bool = AR_SHIFT
) -> torch.Tensor:
    """Hidden states of a block's B slots [rows, B, D] -> logits for its B tokens [rows, B, V].

    shift: token j from slot j-1, token 0 from `first` [rows, V] (the logits at the last committed
    token before the block). No shift: token j from slot j.
    """
    if not shift:
        return model.logits(h_block).float()
    return torch.cat([first[:, None].float(), model.logits(h_block[:, :-1]).float()], dim=1)


def response_logit_index(prefix: int, response: int, block: int, shift: bool = AR_SHIFT) -> torch.Tensor:
    """For each response position t of [prefix | noisy | clean], the slot whose hidden state
    predicts x0_t [R]: the noisy copy of t (no shift), or with the shift the noisy slot t-1 inside
    a block and, for a block's first token, the clean slot t-1 (slot prefix-1 for t = 0)."""
    t = torch.arange(response)
    if not shift:
        return prefix + t
    before = torch.where(t == 0, prefix - 1, prefix + response + t - 1)
    return torch.where(t % block == 0, before, prefix + t - 1)


@dataclass(frozen=True)
class RADConfig:
    block_size: int = 8  # B: 4, 8 or 16 in the paper's sweep
    freeze_vision: bool = True  # vision tower and merger frozen, as in the paper
    seed: int = 0  # the noise of step s comes from (seed, s): a resumed run draws the same masks
    # "flex": FlexAttention block mask (GPU; skips fully masked tiles, which is where RAD saves
    # attention work). "dense": a boolean mask for SDPA (CPU, and the safe default).
    attention: str = "dense"

    def __post_init__(self) -> None:
        from echocxr.errors import UserError

        if self.block_size < 1:
            raise UserError(f"--block-size must be >= 1, got {self.block_size}")
        if self.attention not in ("dense", "flex"):
            raise UserError(f"--attention must be dense or flex, got {self.attention!r}")


@dataclass
class Noise:
    masked: torch.Tensor  # [rows, R] bool: positions replaced by the mask token
    t: torch.Tensor  # [rows, R // B] mask ratio of each block


def sample_noise(rows: int, response: int, block: int, generator: torch.Generator) -> Noise:
    """Per block, n ~ Uniform{1..B} masked positions chosen uniformly at random (CPU generator)."""
    nb = response // block
    n = torch.randint(1, block + 1, (rows, nb), generator=generator)
    u = torch.rand(rows, nb, block, generator=generator)
    rank = u.argsort(-1).argsort(-1)  # a uniform random permutation of each block
    masked = (rank < n[..., None]).reshape(rows, response)
    return Noise(masked, n.float() / block)


def rad_inputs(model: EchoVLM, batch, x_t: torch.Tensor, *, freeze_vision: bool, block: int, flex=False):
    """Embeddings [rows, S, D], positions [3, rows, S] and the attention mask of the RAD layout.
    The mask is dense [rows, 1, S, S] (SDPA) or, with flex, a FlexAttention BlockMask."""
    x0 = batch.response_ids
    rows, P = batch.prompt_ids.shape
    R = x0.shape[1]
    prefix, pos_prompt = prompt_prefix(model, batch, freeze_vision=freeze_vision)
    x = torch.cat([prefix, model.embed(x_t), model.embed(x0)], 1)
    resp = response_positions(pos_prompt, R)  # the noisy copy shares the clean copy's positions
    pos = torch.cat([pos_prompt, resp, resp], 2)
    valid = torch.cat([batch.prompt_valid, torch.ones(rows, 2 * R, dtype=torch.bool, device=x0.device)], 1)
    return x, pos, attention_mask(rad_rule(P, R, block), valid, flex=flex)


def attention_mask(rule, valid: torch.Tensor, *, flex: bool = False):
    """rule(q, k) combined with key validity [rows, S]. A padded query keeps its own slot so its
    softmax row is never empty (its output is never read)."""
    rows, S = valid.shape
    if flex:
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(b, h, q, k):
            return (rule(q, k) & valid[b, k]) | (q == k)

        return create_block_mask(mask_mod, rows, None, S, S, device=valid.device)
    q = torch.arange(S, device=valid.device)[:, None]
    k = torch.arange(S, device=valid.device)[None, :]
    own = q == k
    return ((rule(q, k)[None] & valid[:, None, :]) | own)[:, None]


def rad_loss(
    model: EchoVLM, batch, noise: Noise, *, block: int, freeze_vision: bool = True, flex: bool = False
) -> tuple[torch.Tensor, dict[str, float]]:
    """The RAD objective (module docstring) for one batch and one draw of the noise."""
    x0 = batch.response_ids
    rows, P = batch.prompt_ids.shape
    R = x0.shape[1]
    if R % block:
        raise ValueError(f"response length {R} is not a multiple of the block size {block}")
    masked = noise.masked.to(x0.device)
    x_t = torch.where(masked, model.special.mask, x0)
    x, pos, mask = rad_inputs(model, batch, x_t, freeze_vision=freeze_vision, block=block, flex=flex)
    h = model(x, pos, mask)
    idx = response_logit_index(P, R, block).to(x0.device)
    logits = model.logits(h[:, idx][masked])  # [N_masked, V]: only the supervised slots
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32 softmax
    target = x0[masked]
    ce = F.cross_entropy(logits, target, reduction="none")  # [N_masked]
    inv_t = (1.0 / noise.t.to(x0.device, ce.dtype)).repeat_interleave(block, dim=1)[masked]
    loss = (inv_t * ce).sum() / (rows * R)
    with torch.no_grad():
        is_eos = target == model.special.eos
        logs = {
            "loss": loss.item(),
            "masked_ce": ce.mean().item(),
            "masked_acc": (logits.argmax(-1) == target).float().mean().item(),
            "mask_ratio": masked.float().mean().item(),
            "eos_ce": ce[is_eos].mean().item() if bool(is_eos.any()) else float("nan"),
            "content_ce": ce[~is_eos].mean().item() if bool((~is_eos).any()) else float("nan"),
        }
    return loss, logs


class RADStage:
    """Stage 2 for the shared training loop."""

    name = "rad"

    def __init__(self, cfg: RADConfig):
        self.cfg = cfg
        self.multiple_of = cfg.block_size
        self.freeze_vision = cfg.freeze_vision
        # saved beside the weights: decoders and DCD read the block size from the checkpoint
        self.checkpoint_meta = {"stage": "rad", "block_size": cfg.block_size, "ar_shift": AR_SHIFT}

    def loss(self, model: EchoVLM, batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
        rows, R = batch.response_ids.shape
        noise = sample_noise(rows, R, self.cfg.block_size, g)
        flex = self.cfg.attention == "flex"
        return rad_loss(
            model, batch, noise, block=self.cfg.block_size, freeze_vision=self.freeze_vision, flex=flex
        )

    def state_dict(self) -> dict:
        return {"block_size": self.cfg.block_size, "seed": self.cfg.seed}

    def load_state_dict(self, state: dict) -> None:
        from echocxr.errors import UserError

        if state.get("block_size") != self.cfg.block_size:
            raise UserError(
                f"resuming a RAD run with block size {state.get('block_size')} as block size "
                f"{self.cfg.block_size}: pass --block-size {state.get('block_size')}"
            )


# -- CLI (echocxr train --stage rad) -------------------------------------------------------------


def add_stage_arguments(parser) -> None:
    d = RADConfig()
    g = parser.add_argument_group("RAD (stage 2)")
    if not any("--block-size" in a.option_strings for a in parser._actions):
        g.add_argument("--block-size", type=int, default=d.block_size, help="diffusion block size B")
    g.add_argument(
        "--attention",
        choices=("dense", "flex"),
        default=d.attention,
        help="flex: FlexAttention block mask (CUDA only)",
    )
    g.add_argument(
        "--train-vision", action="store_true", help="also train the vision tower and merger (paper: frozen)"
    )


def build_stage(args, model: EchoVLM, tokenizer, processor) -> RADStage:
    block = getattr(args, "block_size", None) or RADConfig.block_size
    cfg = RADConfig(
        block_size=block,
        freeze_vision=not args.train_vision,
        seed=getattr(args, "seed", 0),
        attention=args.attention,
    )
    if cfg.freeze_vision:
        model.visual.requires_grad_(False)
    return RADStage(cfg)
