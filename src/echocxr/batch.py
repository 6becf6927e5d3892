"""Model inputs for a batch of studies, shared by training (all stages) and decoding.

Prompts are left-padded so every row's response starts at the same slot; responses are
right-padded with <|im_end|> (EOS) to a common length (a multiple of the block size for the
diffusion stages), so the model learns to keep emitting EOS after a report ends.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from echocxr.model.image_processing import preprocess
from echocxr.model.prompt import prompt_ids, response_ids


@dataclass
class Example:
    images: list  # PIL images of one study
    language: str = "en"
    report: str | None = None  # target text (training); None at inference
    record_id: str = ""
    meta: dict = field(default_factory=dict)


@dataclass
class Batch:
    prompt_ids: torch.Tensor  # [B, P] left-padded
    prompt_valid: torch.Tensor  # [B, P] bool, False on padding
    pixel_values: torch.Tensor  # [N_patches, C*T*P*P]
    grid_thw: torch.Tensor  # [n_images, 3]
    response_ids: torch.Tensor | None = None  # [B, R] right-padded with EOS
    response_len: torch.Tensor | None = None  # [B] real tokens including the first EOS
    record_ids: list[str] = field(default_factory=list)

    def to(self, device) -> Batch:
        move = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
        return Batch(**{k: move(v) for k, v in self.__dict__.items()})

    @property
    def size(self) -> int:
        return self.prompt_ids.shape[0]


def collate(
    examples: list[Example],
    tokenizer,
    processor,
    tokens_per_image: int,
    *,
    max_response: int | None = None,
    multiple_of: int = 1,
) -> Batch:
    """Tokenize, left-pad prompts, preprocess images, right-pad responses with EOS."""
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = tokenizer.pad_token_id
    prompts = [prompt_ids(tokenizer, len(ex.images), tokens_per_image, ex.language) for ex in examples]
    P = max(len(p) for p in prompts)
    ids = torch.full((len(examples), P), pad, dtype=torch.long)
    valid = torch.zeros((len(examples), P), dtype=torch.bool)
    for b, p in enumerate(prompts):
        ids[b, P - len(p) :] = torch.tensor(p)
        valid[b, P - len(p) :] = True
    pixel_values, grid_thw = preprocess(processor, [im for ex in examples for im in ex.images])
    batch = Batch(ids, valid, pixel_values, grid_thw, record_ids=[ex.record_id for ex in examples])
    if all(ex.report is not None for ex in examples):
        resp = [response_ids(tokenizer, ex.report) for ex in examples]
        if max_response is not None:  # truncated reports keep their final EOS
            resp = [r if len(r) <= max_response else r[: max_response - 1] + [eos] for r in resp]
        R = max(len(r) for r in resp)
        R = -(-R // multiple_of) * multiple_of
        out = torch.full((len(examples), R), eos, dtype=torch.long)
        for b, r in enumerate(resp):
            out[b, : len(r)] = torch.tensor(r)
        batch.response_ids = out
        batch.response_len = torch.tensor([len(r) for r in resp])
    return batch
