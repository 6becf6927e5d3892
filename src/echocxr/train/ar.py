"""Stage 1: continued autoregressive training on reports (ECHO_AR).

One sequence per study, [prompt (vision + instruction) | response], causal attention with the
left-padded prompt slots hidden as keys. The loss is next-token cross-entropy on the response
tokens up to and including the first EOS; the EOS padding after it is not a target (the AR
decoder stops at the first EOS, so nothing after it is ever read).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from echocxr.model.layout import ar_inputs
from echocxr.model.vlm import EchoVLM


def ar_logits(model: EchoVLM, batch, *, freeze_vision: bool = False) -> torch.Tensor:
    """Logits [rows, R, V] where row b, slot j predicts response token j (read from the slot
    before it: the prompt's last token for j = 0)."""
    P, R = batch.prompt_ids.shape[1], batch.response_ids.shape[1]
    x, pos, mask = ar_inputs(model, batch, freeze_vision=freeze_vision)  # [prompt | response] causal
    hidden = model(x, pos, mask)
    return model.logits(hidden[:, P - 1 : P + R - 1])


def ar_loss(model: EchoVLM, batch, *, freeze_vision: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean cross-entropy over the response tokens up to and including each row's first EOS."""
    logits = ar_logits(model, batch, freeze_vision=freeze_vision)
    R = logits.shape[1]
    target = batch.response_ids.masked_fill(
        torch.arange(R, device=logits.device)[None] >= batch.response_len.to(logits.device)[:, None], -100
    )
    loss = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=-100)
    return loss, {"ce": loss.item(), "targets": int((target >= 0).sum())}


class ARStage:
    """Stage 1 for the shared training loop."""

    name = "ar"
    multiple_of = 1
    uses_loop_batches = True

    def __init__(self, freeze_vision: bool = False):
        self.freeze_vision = freeze_vision
        self.checkpoint_meta = {"stage": "ar", "freeze_vision": freeze_vision}

    def loss(self, model: EchoVLM, batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        return ar_loss(model, batch, freeze_vision=self.freeze_vision)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def add_stage_arguments(parser) -> None:
    g = parser.add_argument_group("AR (stage 1)")
    g.add_argument("--freeze-vision", action="store_true", help="AR: keep the vision tower and merger fixed")


def build_stage(args, model: EchoVLM, tokenizer, processor) -> ARStage:
    return ARStage(freeze_vision=args.freeze_vision)
