"""The model-facing part of the server: one object that owns the checkpoint and decodes batches.

`ReportBackend` is the only place that touches the model. The batcher's worker thread is the only
caller of `decode`; request handlers call only the read-only helpers (`example`: image resizing,
`text`: detokenizing, `prompt_tokens`). It drives one `echocxr.decode.engine.Engine`,
which allocates its KV-cache buffers (and captured graphs on CUDA) once per batch row count and
reuses them call after call, and which calls back after every committed block (every token for
AR): those callbacks become the per-block stream.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from echocxr.batch import Batch


@dataclass
class RowResult:
    tokens: list[int]  # generated ids, EOS excluded
    stopped: bool  # True: the model wrote EOS; False: the row hit its max_tokens
    forwards: int  # forwards of the batch until this row finished (prefill excluded)
    prefill_ms: float
    decode_ms: float  # from the end of the prefill to this row's last commit


@dataclass
class RowEvent:
    """Newly committed tokens of one batch row (EOS cut off), as they become final. The row's
    finished event carries its `result`, so it can be answered before its batch-mates end."""

    row: int
    tokens: list[int]
    finished: bool
    forwards: int  # forwards run so far in this batch (prefill excluded)
    elapsed_ms: float  # since the batch's decode call started (prefill included)
    result: RowResult | None = None  # set on the finished event


@dataclass
class Row:
    """One study ready to decode: a one-row `Batch` (from `batch.collate`) and what groups it."""

    batch: Batch
    language: str
    n_images: int


def merge_rows(rows: list[Row]) -> Batch:
    """One-row batches with identical prompts -> one batch (rows stacked in order).

    Equal to `batch.collate` of the same examples (tests/test_serve.py checks it), without
    re-running the image processor on the decode thread. Raises ValueError when prompts differ
    (the batcher's grouping rule never sends such rows together).
    """
    import torch

    first = rows[0].batch
    for r in rows[1:]:
        if not torch.equal(r.batch.prompt_ids, first.prompt_ids):
            raise ValueError("rows with different prompts cannot share a batch without padding")
    cat = lambda name: torch.cat([getattr(r.batch, name) for r in rows])  # noqa: E731
    return Batch(
        prompt_ids=cat("prompt_ids"),  # [B, P]
        prompt_valid=cat("prompt_valid"),  # [B, P]
        pixel_values=cat("pixel_values"),  # [sum of patches, C*T*P*P]
        grid_thw=cat("grid_thw"),  # [n_images, 3], in row order as collate lists them
        record_ids=[i for r in rows for i in r.batch.record_ids],
    )


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
        """What the checkpoint's metadata says its training images were: "real", "phantom",
        "mixed" (`train.data.TRAINED_ON`: the `trained_on` key `echocxr train` writes from the
        images its stages counted) or "unknown" (the key is absent: a checkpoint that predates
        it, or one whose stages counted no images)."""
        from echocxr.train.data import TRAINED_ON

        value = self.meta.get("trained_on")
        return value if value in TRAINED_ON else "unknown"

    def example(self, images, language: str) -> Row:
        """Decoded images of one study -> its model input as a one-row `Batch` (`batch.collate`:
        the fixed instruction in EN or ZH, the image processor's patches). Each image first goes
        through `data.images.prepare_image` at the preset's image size, the one preprocessing step
        training and `echocxr generate` share. Request threads call this, so the image work runs
        beside the decode thread instead of on it."""
        from echocxr.batch import Example, collate
        from echocxr.data.images import prepare_image

        size = self.model.config.image_size
        example = Example([prepare_image(im, size) for im in images], language)
        batch = collate([example], self.tokenizer, self.processor, self.model.config.image_tokens)
        return Row(batch, language, len(images))

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
        seeds: list[int] | None = None,
    ) -> list[RowResult]:
        """Decode `examples` (`Row`s from `example`, with identical prompts) as one batch with `cfg`
        (its max_new_tokens and seed are ignored: each row stops at its own `max_new_tokens[i]` and
        samples from its own generator seeded with `seeds[i]`, default cfg.seed). `on_event`
        is called from this thread as blocks commit; a row's finished event carries its
        `RowResult` (the same as the returned one), so callers answer it before the batch ends."""
        batch = merge_rows(examples).to(self.device)
        cfg = replace(cfg, max_new_tokens=max(max_new_tokens))
        emit = on_event or (lambda ev: None)
        results: list[RowResult | None] = [None] * len(examples)

        def on_commit(ev) -> None:
            for row, toks, fin, total in zip(ev.rows, ev.tokens, ev.finished, ev.totals, strict=True):
                toks = [t for t in toks if t != self.eos]
                result = None
                if fin:
                    decode_ms = max(ev.elapsed_ms - ev.prefill_ms, 0.0)
                    ids = [t for t in total if t != self.eos]
                    result = RowResult(ids, self.eos in total, ev.forwards, ev.prefill_ms, decode_ms)
                    results[row] = result
                emit(RowEvent(row, toks, bool(fin), ev.forwards, ev.elapsed_ms, result))

        out = self.engine.generate(
            batch, cfg, on_commit=on_commit, max_new_tokens_per_row=max_new_tokens, seeds=seeds
        )
        missing = [i for i, r in enumerate(results) if r is None]
        if missing:  # every row ends at its EOS or its cap, so the engine reported each finish
            raise RuntimeError(f"rows {missing} ended without a finished event ({out.forwards} forwards)")
        return results
