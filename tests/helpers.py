"""Builders shared by the model and decoder tests (imported as `helpers`: pytest puts tests/ on
sys.path). Plain functions, no fixtures: each test module keeps its own fixture scope."""

from __future__ import annotations

import torch

# A small bilingual corpus: enough for a BPE tokenizer and a few reports to decode or train on.
REPORTS = [
    "Findings: The heart is normal in size. No pleural effusion. No pneumothorax.\nImpression: Normal chest.",
    "Findings: Mild cardiomegaly. Small left pleural effusion.\nImpression: Cardiomegaly with effusion.",
    "所见：心影大小正常。无胸腔积液。无气胸。\n印象：胸部未见异常。",
] * 20


@torch.no_grad()
def widen(model, std: float = 0.3, seed: int = 0):
    """Redraw every matrix of `model.hf` from N(0, std^2) (seeded) and return the model. At the
    default init (std 0.02) a tiny random model emits one position-driven pattern whatever its
    input; a wider init makes its tokens depend on the image and on the text so far."""
    g = torch.Generator().manual_seed(seed)
    for p in model.hf.parameters():
        if p.dim() == 2:
            p.normal_(0, std, generator=g)
    return model


def prefer_banned(model):
    """Make `model.logits` favour the mask token most, then pad, the image token and vision start
    (an instance attribute: only this model), so a decoder without the guard emits them (the
    reproduction of issue #14 item 6). Returns the model."""
    s = model.special
    bias = torch.zeros(model.vocab_size)
    bias[s.mask], bias[s.pad], bias[s.image], bias[s.vision_start] = 60.0, 50.0, 40.0, 30.0
    plain = model.logits
    model.logits = lambda h: plain(h) + bias.to(h.dtype)
    return model


def noise_image(rng, side: int = 64):
    """A side x side grayscale PIL image of uniform noise from numpy Generator `rng` (a stand-in
    radiograph: the processor resizes it to the preset's input)."""
    import numpy as np
    from PIL import Image

    return Image.fromarray(rng.integers(0, 255, (side, side), dtype=np.uint8))
