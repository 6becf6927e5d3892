"""Model inputs shared by the training objectives. They live in `model.layout` (the decoders use
them too); these names stay for stage modules written against them."""

from __future__ import annotations

from echocxr.model.layout import prompt_inputs as prompt_prefix  # noqa: F401
from echocxr.model.layout import response_positions  # noqa: F401
