"""The model-facing part of the server: one object that owns the checkpoint and decodes batches.

`ReportBackend` is the only place that touches the model. The batcher's worker thread is the only
caller of `decode`; request handlers call only the read-only helpers (`example`: image resizing,
`text`: detokenizing, `prompt_tokens`). It drives one `echocxr.decode.engine.Engine`,
which allocates its KV-cache buffers (and captured graphs on CUDA) once per batch row count and
reuses them call after call, and which calls back after every committed block (every token for
AR): those callbacks become the per-block stream.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace


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
        from echocxr.decode.engine import Engine

        self.device = device
        self.engine = Engine.from_checkpoint(
            ckpt, device=device, decoder=decoder, block_size=block_size, steps=steps, fused=fused
        )
        self.model, self.tokenizer, self.processor = (
            self.engine.model,
            self.engine.tokenizer,
            self.engine.processor,
        )
        self.meta, self.cfg = self.engine.meta, self.engine.cfg
        self.eos = self.model.special.eos
        self._prompt_len: dict[tuple[int, str], int] = {}

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
        """Token ids (EOS excluded) -> text, through the engine (which refuses guarded ids)."""
        return self.engine.text(ids)

    def prompt_tokens(self, n_images: int, language: str) -> int:
        """Prompt length in tokens (image tokens included): the `usage.prompt_tokens` of a request."""
        from echocxr.model.prompt import prompt_ids

        key = (n_images, language)
        if key not in self._prompt_len:
            ids = prompt_ids(self.tokenizer, n_images, self.model.config.image_tokens, language)
            self._prompt_len[key] = len(ids)
        return self._prompt_len[key]

    def decode(
        self,
        examples: list,
        cfg,
        max_new_tokens: list[int],
        on_event: Callable[[RowEvent], None] | None = None,
    ) -> list[RowResult]:
        """Decode `examples` as one batch with `cfg` (its max_new_tokens is ignored: each row stops at
        its own `max_new_tokens[i]`). `on_event` is called from this thread as blocks commit."""
        from echocxr.batch import collate

        batch = collate(examples, self.tokenizer, self.processor, self.model.config.image_tokens)
        batch = batch.to(self.device)
        cfg = replace(cfg, max_new_tokens=max(max_new_tokens))
        emit = on_event or (lambda ev: None)
        t0 = time.perf_counter()

        def on_commit(ev) -> None:
            for row, toks, fin in zip(ev.rows, ev.tokens, ev.finished, strict=True):
                toks = [t for t in toks if t != self.eos]
                emit(RowEvent(row, toks, bool(fin), ev.forwards, ev.elapsed_ms))

        out = self.engine.generate(batch, cfg, on_commit=on_commit, max_new_tokens_per_row=max_new_tokens)
        total_ms = (time.perf_counter() - t0) * 1000
        prefill_ms = float(out.stats.get("prefill_s") or 0.0) * 1000
        results = []
        for ids, cap in zip(out.tokens, max_new_tokens, strict=True):
            stopped = self.eos in ids[:cap]
            ids = [t for t in ids[:cap] if t != self.eos]
            results.append(RowResult(ids, stopped, out.forwards, prefill_ms, max(total_ms - prefill_ms, 0.0)))
        return results
