"""Stage 0: warm-start the vision tower and patch merger on the corpus's own finding labels.

A real base model (Qwen2.5-VL, Lingshu) brings a pretrained vision tower; our from-scratch
presets do not, and Stage 1 alone learns to write the normal template without reading the image
(issue 13). Stage 0 trains `visual` (patch embedding, blocks, merger) with a multi-label head on
the merged image tokens: mean over each study's tokens, then one linear layer to one logit per
abnormal observation (`CLASSES`: the labeler's vocabulary without `no_finding`), binary
cross-entropy (positives weighted by the class's negative/positive ratio, at most 20) against

- the findings a phantom was drawn with (`findings_for_record`) when the study's image is a
  phantom, and
- the labeler's positive findings (`record.labels`) when it is a real image,

so the target is what the picture shows. The language model is frozen and not stored in the
trainer checkpoints (rebuilt from `--init`). The head lives on the model as `vision_head` only
during this stage: it is trained and checkpointed for resume, but it is kept out of the VLM
weights: `save_pretrained` writes the Qwen2.5-VL weights only and the head goes to its own file
`final/vision_head.safetensors`, so `final/` is a plain checkpoint that `--stage ar --init
OUT/final` continues from. A pretrained checkpoint (a folder without an echocxr model preset) skips the stage.

Why a multi-label head and not an image-report contrastive loss: the labels are exact for
phantoms, the loss reads like the metric we care about (does the model see each finding), and
contrastive training needs many negatives per batch, which CPU batches of 8-16 studies lack.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from echocxr.data.observations import OBSERVATIONS
from echocxr.model.vlm import ECHO_CONFIG, EchoVLM

CLASSES: tuple[str, ...] = tuple(o for o in OBSERVATIONS if o != "no_finding")
HEAD_FILE = "vision_head.safetensors"  # in OUT/final, beside the Qwen2.5-VL weights
VIEWS = ("frontal",)  # the views StudyStream draws (study_images' default)


def is_pretrained(init: str) -> bool:
    """True when --init is a checkpoint folder that is not one of our preset models: a local
    Qwen2.5-VL / Lingshu download (no echocxr.json, or one without a model preset)."""
    path = Path(init)
    if not path.is_dir():
        return False
    meta = path / ECHO_CONFIG
    if not meta.is_file():
        return True
    try:
        return not json.loads(meta.read_text()).get("model")
    except json.JSONDecodeError:
        return True


def label_vector(record, *, real: bool) -> torch.Tensor:
    """[len(CLASSES)] float 0/1: the labeler's positives for a real image, the drawn findings for a
    phantom (IU: its MeSH-derived findings, docs/PHANTOMS.md)."""
    from echocxr.data.phantom import findings_for_record

    if real:
        found = {o for o, a in (record.labels or {}).items() if a.get("status", "positive") == "positive"}
    else:
        found = set(findings_for_record(record)[0])
    return torch.tensor([float(c in found) for c in CLASSES])


def study_labels(corpus: str, image_source: str) -> dict[str, torch.Tensor]:
    """record_id -> label vector for every training record, deciding real vs phantom the way
    `study_images` does (real files for every view, unless `image_source` is phantom)."""
    from echocxr.data.images import real_image_paths
    from echocxr.data.records import load_corpus

    root = Path(corpus).parent
    out = {}
    for r in load_corpus(corpus, split="train"):
        real = image_source != "phantom" and real_image_paths(r, VIEWS, root) is not None
        out[r.record_id] = label_vector(r, real=real)
    return out


def pooled_features(model: EchoVLM, batch) -> torch.Tensor:
    """Mean merged image feature per row: [rows, D]. Rows own their images in order; a row's
    share of the features is its count of <|image_pad|> slots."""
    feats = model.encode_images(batch.pixel_values, batch.grid_thw)  # [N_tokens, D]
    per_row = (batch.prompt_ids == model.special.image).sum(1).tolist()
    return torch.stack([f.mean(0) for f in feats.split(per_row)])


def positive_weight(y: torch.Tensor, cap: float = 20.0) -> torch.Tensor:
    """BCE weight of the positives per class, negatives/positives clipped to [1, cap], from the
    label table y [studies, C]. Most findings are rare: unweighted, the head learns their priors
    and the tower barely moves (as in `echocxr bench phantoms`, which weighs the same way)."""
    pos = y.sum(0)
    return ((len(y) - pos) / pos.clamp(min=1)).clamp(1.0, cap)


class VisionStage:
    """Stage 0 for the shared training loop: BCE of the head's logits against the study labels."""

    name = "vision"
    multiple_of = 1
    uses_loop_batches = True
    freeze_vision = False

    def __init__(self, labels: dict[str, torch.Tensor]):
        self.labels = labels
        self.pos_weight = positive_weight(torch.stack(list(labels.values())))
        self.checkpoint_meta = {"stage": "vision", "vision_classes": list(CLASSES)}

    def loss(self, model: EchoVLM, batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        z = model.vision_head(pooled_features(model, batch).float())  # [rows, C]
        y = torch.stack([self.labels[r] for r in batch.record_ids]).to(z.device)
        loss = F.binary_cross_entropy_with_logits(z, y, pos_weight=self.pos_weight.to(z.device))
        with torch.no_grad():
            hit = ((z > 0) == (y > 0.5)).float().mean()
        return loss, {"bce": loss.item(), "label_acc": hit.item(), "positives": float(y.sum())}

    def save_extra(self, model: EchoVLM, final: Path, full_state: dict | None = None) -> None:
        """Write the head to final/vision_head.safetensors (a probe for later checks; Stage 1
        does not read it). full_state: the gathered state dict of a sharded (FSDP2) model, whose
        own head parameters are shards."""
        from safetensors.torch import save_file

        if full_state is None:
            head = model.vision_head.state_dict()
        else:
            head = {
                k.removeprefix("vision_head."): v
                for k, v in full_state.items()
                if k.startswith("vision_head.")
            }
        state = {k: v.detach().float().cpu().contiguous() for k, v in head.items()}
        save_file(state, final / HEAD_FILE, metadata={"classes": json.dumps(list(CLASSES))})

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def add_stage_arguments(parser) -> None:
    pass  # Stage 0 uses the common flags only


def attach_head(model: EchoVLM, seed: int) -> nn.Linear:
    """Freeze everything but `visual` and add a seeded linear head [D -> len(CLASSES)]."""
    model.requires_grad_(False)
    model.visual.requires_grad_(True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Linear(model.lm.config.hidden_size, len(CLASSES))
    model.vision_head = head.to(model.device)  # registered submodule: trained and checkpointed
    return head


def build_stage(args, model: EchoVLM, tokenizer, processor) -> VisionStage:
    from echocxr.errors import UserError

    if getattr(args, "freeze_vision", False) or getattr(args, "lora_rank", 0):
        raise UserError("--stage vision trains the vision tower only: drop --freeze-vision and --lora-rank")
    attach_head(model, args.seed)
    return VisionStage(study_labels(args.corpus, args.image_source))
