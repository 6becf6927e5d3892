"""The model-facing part of the server: one object that owns the checkpoint and decodes batches.

`ReportBackend` is the only place that touches the model. The batcher's worker thread is its only
caller, so nothing here is shared between threads. It drives `echocxr.decode.engine.Engine`, which
allocates its cache buffers (and captured graphs) once and calls back after every committed block
(every token for AR); when that module is absent it falls back to `decode.api.generate`, which
reports each row once, at the end of its batch (`streams_blocks` says which).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from echocxr.errors import UserError

STAGE_DECODER = {"ar": "ar", "rad": "block", "dcd": "onestep"}  # as `echocxr generate` chooses


@dataclass
class RowEvent:
    """Newly committed tokens of one batch row (EOS cut off), as they become final."""

    row: int
    tokens: list[int]
    finished: bool
    forwards: int  # forwards run so far in this batch (prefill excluded)
    elapsed_ms: float  # since the batch's decode call started (prefill included)


@dataclass
class RowResult:
    tokens: list[int]  # generated ids, EOS excluded
    stopped: bool  # True: the model wrote EOS; False: the row hit its max_tokens
    forwards: int  # forwards of the batch this row was decoded in (prefill excluded)
    prefill_ms: float
    decode_ms: float


class ReportBackend:
    """Checkpoint -> model, tokenizer, image processor and the default `DecodeConfig`.

    The default decoder and block size come from the checkpoint's metadata (stage -> decoder, the
    trained block size); `decoder`, `block_size`, `steps`, `fused` override them.
    Raises `UserError` for a directory that is not a checkpoint.
    """

    def __init__(
        self,
        ckpt,
        *,
        device: str = "cpu",
        decoder: str | None = None,
        block_size: int | None = None,
        steps: int | None = None,
        fused: bool | None = None,
    ):
        overrides = {
            k: v
            for k, v in dict(decoder=decoder, block_size=block_size, steps=steps, fused=fused).items()
            if v is not None
        }
        if block_size is not None and steps is None:
            overrides["steps"] = block_size
        try:
            from echocxr.decode.engine import Engine
        except ImportError:
            Engine = None
        self.device = device
        if Engine is not None:
            self.engine = Engine.from_checkpoint(ckpt, device=device, **overrides)
            self.model, self.tokenizer, self.processor = (
                self.engine.model,
                self.engine.tokenizer,
                self.engine.processor,
            )
            self.meta = dict(getattr(self.engine, "meta", {}) or {})
            self.cfg = self.engine.cfg
        else:
            from echocxr.decode.api import DecodeConfig
            from echocxr.model.vlm import EchoVLM

            self.engine = None
            self.model, self.tokenizer, self.processor, self.meta = EchoVLM.from_pretrained(
                ckpt, device=device
            )
            self.model.eval()
            block = self.meta.get("block_size") or DecodeConfig.block_size
            base = DecodeConfig(
                decoder=STAGE_DECODER.get(self.meta.get("stage", "ar"), "ar"), block_size=block, steps=block
            )
            self.cfg = replace(base, **overrides)
        if self.model.config is None:  # the prompt's image-token count comes from the preset
            raise UserError(f"{ckpt}: no echocxr.json with the model preset (save it with echocxr train)")
        self.eos = self.model.special.eos

    @property
    def streams_blocks(self) -> bool:
        """True when rows are reported block by block (the engine), False when once at the end."""
        return self.engine is not None

    @property
    def stage(self) -> str:
        return str(self.meta.get("stage", "unknown"))

    @property
    def trained_on(self) -> str:
        """What the checkpoint's metadata says its training images were: "real", "phantom" or
        "unknown" (the `trained_on` key of echocxr.json; absent in checkpoints that predate it)."""
        value = self.meta.get("trained_on")
        return value if value in ("real", "phantom") else "unknown"

    def example(self, images, language: str):
        """Decoded images of one study -> the model's input for it (fixed instruction, EN or ZH).
        Each image goes through `data.images.prepare_image` at the preset's image size, the one
        preprocessing step training and `echocxr generate` share."""
        from echocxr.batch import Example
        from echocxr.data.images import prepare_image

        size = self.model.config.image_size
        return Example([prepare_image(im, size) for im in images], language)

    def text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def prompt_tokens(self, n_images: int, language: str) -> int:
        from echocxr.model.prompt import prompt_ids

        return len(prompt_ids(self.tokenizer, n_images, self.model.config.image_tokens, language))

    def decode(
        self,
        examples: list,
        cfg,
        max_new_tokens: list[int],
        on_event: Callable[[RowEvent], None] | None = None,
    ) -> list[RowResult]:
        """Decode `examples` as one batch with `cfg` (its max_new_tokens is ignored: each row stops at
        its own `max_new_tokens[i]`). `on_event` is called from this thread as blocks commit."""
        import torch

        from echocxr.batch import collate

        batch = collate(examples, self.tokenizer, self.processor, self.model.config.image_tokens)
        batch = batch.to(self.device)
        cfg = replace(cfg, max_new_tokens=max(max_new_tokens))
        emit = on_event or (lambda ev: None)
        t0 = time.perf_counter()
        with torch.no_grad():
            if self.engine is not None:

                def on_commit(ev) -> None:
                    for row, toks, fin in zip(ev.rows, ev.tokens, ev.finished, strict=True):
                        emit(RowEvent(row, list(toks), bool(fin), ev.forwards, ev.elapsed_ms))

                out = self.engine.generate(
                    batch, cfg, on_commit=on_commit, max_new_tokens_per_row=max_new_tokens
                )
            else:
                from echocxr.decode.api import generate

                out = generate(self.model, batch, cfg)
        total_ms = (time.perf_counter() - t0) * 1000
        prefill_ms = float(out.stats.get("prefill_s", 0.0)) * 1000
        results = []
        for row, (ids, cap) in enumerate(zip(out.tokens, max_new_tokens, strict=True)):
            stopped = self.eos in ids[:cap]
            ids = [t for t in ids[:cap] if t != self.eos]
            results.append(RowResult(ids, stopped, out.forwards, prefill_ms, max(total_ms - prefill_ms, 0.0)))
            if self.engine is None:  # no per-block callback: the whole row at once
                emit(RowEvent(row, ids, True, out.forwards, total_ms))
        return results
