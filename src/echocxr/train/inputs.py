"""Model inputs shared by the training objectives: the embedded prompt (images scattered into
their slots) and the positions of the response that follows it."""

from __future__ import annotations

import torch

from echocxr.model.vlm import EchoVLM


def prompt_prefix(model: EchoVLM, batch, *, freeze_vision: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Embedded prompt [rows, P, D] and its M-RoPE positions [3, rows, P]. With a frozen vision
    tower the image features are computed without keeping activations for backward."""
    if batch.pixel_values is not None and freeze_vision:
        with torch.no_grad():
            feats = model.encode_images(batch.pixel_values, batch.grid_thw)
        prefix = model.embed(batch.prompt_ids, image_features=feats)
    else:
        prefix = model.embed(batch.prompt_ids, batch.pixel_values, batch.grid_thw)
    pos = model.positions(batch.prompt_ids, batch.grid_thw, valid=batch.prompt_valid)
    return prefix, pos


def response_positions(pos_prompt: torch.Tensor, length: int) -> torch.Tensor:
    """Text positions [3, rows, length] continuing each row's prompt (all three M-RoPE axes equal)."""
    start = pos_prompt.amax(dim=(0, 2))[:, None] + 1
    resp = start + torch.arange(length, device=pos_prompt.device)[None]
    return resp[None].expand(3, -1, -1)
