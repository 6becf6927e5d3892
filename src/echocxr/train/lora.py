"""LoRA adapters (peft) on the language model's projections, for 7B-scale runs.

Adapters go on q/k/v/o and the MLP projections of every decoder layer; everything else is frozen.
Our forward calls those Linear modules directly, so peft's in-place layer replacement is all that
is needed. The final checkpoint merges the adapters into the base weights, so every decoder and
`EchoVLM.from_pretrained` read it as a plain Qwen2.5-VL checkpoint.

DCD's teacher in a LoRA run is the student with its adapters disabled (`BaseTeacher`): one copy of
the base weights in memory instead of two (a 7B student and a deep-copied teacher are 2 x 16.6 GB).
"""

from __future__ import annotations

import contextlib
import copy

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


def adapter_state(model) -> dict:
    """name -> a CPU copy of every LoRA adapter weight in `model.hf` (empty without adapters)."""
    return {n: p.detach().float().cpu().clone() for n, p in model.hf.named_parameters() if ".lora_" in n}


@contextlib.contextmanager
def adapters_disabled(module):
    """peft's `PeftModel.disable_adapter()` for a module holding LoRA layers without a PeftModel
    around it: each enabled adapter layer computes its base layer alone, and is enabled again on
    exit (peft's `enable_adapters` also restores the adapters' requires_grad)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer) and not m.disable_adapters]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)


class BaseTeacher:
    """The student seen without its adapters: every forward runs under `adapters_disabled`, every
    other attribute is the student's. It owns no weights, so `to`, `eval` and `requires_grad_`
    leave the student as it is (`decode_share`'s own eval/train switch passes through)."""

    def __init__(self, student):
        self.student = student

    def __getattr__(self, name):  # only reached for names this class does not define
        return getattr(self.student, name)

    def __call__(self, *args, **kwargs):
        with adapters_disabled(self.student.hf):
            return self.student(*args, **kwargs)

    forward = __call__

    def to(self, *args, **kwargs):
        return self

    def requires_grad_(self, requires_grad: bool = True):
        return self


def dcd_teacher(model, lora_rank: int = 0):
    """DCD's teacher when the student starts as it: with LoRA the student with its adapters off
    (adapters are added after the stage is built; the teacher finds them at each forward), else
    a frozen deep copy."""
    if lora_rank:
        return BaseTeacher(model)
    return copy.deepcopy(model).eval().requires_grad_(False)
