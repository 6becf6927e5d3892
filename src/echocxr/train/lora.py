"""LoRA adapters (peft) on the language model's projections, for 7B-scale runs.

Adapters go on q/k/v/o and the MLP projections of every decoder layer; everything else is frozen.
Our forward calls those Linear modules directly, so peft's in-place layer replacement is all that
is needed. The final checkpoint merges the adapters into the base weights, so every decoder and
`EchoVLM.from_pretrained` read it as a plain Qwen2.5-VL checkpoint.
"""

from __future__ import annotations

from echocxr.errors import UserError

TARGETS = r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


def add_lora(model, rank: int, alpha: float | None = None):
    """Inject adapters into model.hf in place; returns the peft LoraModel that owns them."""
    try:
        from peft import LoraConfig, LoraModel
    except ImportError:
        raise UserError("--lora-rank needs peft: pip install peft") from None
    if rank < 1:
        raise UserError(f"--lora-rank must be >= 1, not {rank}")
    cfg = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=0.0, target_modules=TARGETS)
    lora = LoraModel(model.hf, cfg, "default")  # marks only the adapters trainable
    return lora


def merge_lora(model, lora) -> None:
    """Fold the adapters into the base weights and restore plain Linear modules."""
    model.hf = lora.merge_and_unload()
