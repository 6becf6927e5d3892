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

The layout itself (inputs, positions, the padding-aware mask, the token shift and which slot
predicts which token) is `model.layout`, shared with the decoders and DCD; its docstring gives the
shift rule. `layout.rad_inputs` builds this stage's sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from echocxr.model.denoise import BLOCK_SIZE
from echocxr.model.layout import (
    LAYOUTS,
    checkpoint_fields,
    duplicated_inputs,
    duplicated_logit_index,
    rad_inputs,
    response_logit_index,
)
from echocxr.model.vlm import EchoVLM


@dataclass(frozen=True)
class RADConfig:
    block_size: int = BLOCK_SIZE  # B: 4, 8 or 16 in the paper's sweep
    freeze_vision: bool = True  # vision tower and merger frozen, as in the paper
    seed: int = 0  # the noise of step s comes from (seed, s): a resumed run draws the same masks
    # "flex": FlexAttention block mask (GPU; skips fully masked tiles, which is where RAD saves
    # attention work). "dense": a boolean mask for SDPA (CPU, and the safe default).
    attention: str = "dense"
    # "rad": ECHO's layout. "duplicated": the full-duplication ablation (`masks.duplicated`): the
    # prompt appears twice, S = 2(P + R) instead of P + 2R, same loss (issue #20, docs/RAD.md).
    layout: str = "rad"

    def __post_init__(self) -> None:
        from echocxr.errors import UserError

        if self.block_size < 1:
            raise UserError(f"--block-size must be >= 1, got {self.block_size}")
        if self.attention not in ("dense", "flex"):
            raise UserError(f"--attention must be dense or flex, got {self.attention!r}")
        if self.layout not in LAYOUTS:
            raise UserError(f"--layout must be one of {LAYOUTS}, got {self.layout!r}")


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


def rad_loss(
    model: EchoVLM,
    batch,
    noise: Noise,
    *,
    block: int,
    freeze_vision: bool = True,
    flex: bool = False,
    layout: str = "rad",
) -> tuple[torch.Tensor, dict[str, float]]:
    """The RAD objective (module docstring) for one batch and one draw of the noise, in the RAD
    layout or (layout="duplicated") the full-duplication ablation's."""
    x0 = batch.response_ids
    rows, P = batch.prompt_ids.shape
    R = x0.shape[1]
    if R % block:
        raise ValueError(f"response length {R} is not a multiple of the block size {block}")
    masked = noise.masked.to(x0.device)
    x_t = torch.where(masked, model.special.mask, x0)
    inputs, index = (
        (duplicated_inputs, duplicated_logit_index)
        if layout == "duplicated"
        else (rad_inputs, response_logit_index)
    )
    x, pos, mask = inputs(model, batch, x_t, freeze_vision=freeze_vision, block=block, flex=flex)
    h = model(x, pos, mask)
    idx = index(P, R, block).to(x0.device)
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
        self.checkpoint_meta = {
            "stage": "rad",
            "block_size": cfg.block_size,
            "rad_layout": cfg.layout,
            **checkpoint_fields(),
        }

    def loss(self, model: EchoVLM, batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
        rows, R = batch.response_ids.shape
        noise = sample_noise(rows, R, self.cfg.block_size, g)
        flex = self.cfg.attention == "flex"
        return rad_loss(
            model,
            batch,
            noise,
            block=self.cfg.block_size,
            freeze_vision=self.freeze_vision,
            flex=flex,
            layout=self.cfg.layout,
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
    g.add_argument(
        "--layout",
        choices=LAYOUTS,
        default=d.layout,
        help="duplicated: the full-duplication ablation (the prompt twice; same loss, more compute)",
    )


def build_stage(args, model: EchoVLM, tokenizer, processor) -> RADStage:
    block = getattr(args, "block_size", None) or RADConfig.block_size
    cfg = RADConfig(
        block_size=block,
        freeze_vision=not args.train_vision,
        seed=getattr(args, "seed", 0),
        attention=args.attention,
        layout=args.layout,
    )
    if cfg.freeze_vision:
        model.visual.requires_grad_(False)
    return RADStage(cfg)
