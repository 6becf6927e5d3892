"""Training batches from a corpus file: a deterministic, resumable stream.

The stream is an endless sequence of training studies: epoch e is a permutation of the n entries
drawn from (seed, e), and stream position k is entry perm_e[k mod n] with e = k // n. An entry is a
record, or one of `repeat_abnormal` copies of a record whose report has an abnormal finding
(`--repeat-abnormal`: rare findings are written more often; each copy gets its own phantom render). Optimizer
step s, micro-batch m of rank r (of `world`) covers positions

    [((s * accum + m) * world + r) * B, ... + B)

so the data position of a run is its step count, a resumed run reads exactly what the killed one
would have read, and a DDP job over W ranks with batch B reads the same examples per step as one
process with batch W * B. Images come from `study_images`: real files when the record has them
(`--image-source auto|real`), phantom renders otherwise, fresh per epoch (augmentation) and
determined by (study, seed, epoch), so worker processes change nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from echocxr.batch import Batch, Example, collate
from echocxr.errors import UserError


@dataclass(frozen=True)
class Layout:
    batch_size: int  # per rank, per micro-batch
    grad_accum: int = 1
    world: int = 1
    rank: int = 0

    def start(self, step: int, micro: int) -> int:
        return ((step * self.grad_accum + micro) * self.world + self.rank) * self.batch_size


class StudyStream:
    """Examples and batches at stream positions (see the module docstring)."""

    def __init__(
        self,
        corpus: str,
        *,
        tokenizer,
        processor,
        tokens_per_image: int,
        image_size: int,
        seed: int = 0,
        image_source: str = "auto",
        max_response: int | None = None,
        multiple_of: int = 1,
        split: str = "train",
        repeat_abnormal: int = 1,
    ):
        from echocxr.data.phantom import MIN_SIZE
        from echocxr.data.records import load_corpus

        path = Path(corpus)
        if not path.is_file():
            raise UserError(f"{corpus}: corpus file not found (make one with `echocxr data build`)")
        records = [r for r in load_corpus(path, split=split) if r.findings.strip() or r.impression.strip()]
        if not records:
            raise UserError(f"{corpus}: no {split!r} records with a findings or impression text")
        if repeat_abnormal < 1:
            raise UserError(f"--repeat-abnormal must be >= 1, got {repeat_abnormal}")
        self.records, self.root = records, path.parent
        # (record index, copy): a study with an abnormal finding appears repeat_abnormal times per epoch
        self.entries = [
            (i, c)
            for i, r in enumerate(records)
            for c in range(repeat_abnormal if has_abnormal_finding(r) else 1)
        ]
        self.tokenizer, self.processor, self.tokens_per_image = tokenizer, processor, tokens_per_image
        self.image_size = max(image_size, MIN_SIZE)  # the processor resizes to the model's size
        self.seed, self.image_source = seed, image_source
        self.max_response, self.multiple_of = max_response, multiple_of
        self._perms: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(len(self.entries), generator=g).tolist()}
        return self._perms[epoch]

    def example(self, position: int) -> Example:
        from echocxr.data.images import study_images

        epoch, i = divmod(position, len(self.entries))
        index, copy = self.entries[self._perm(epoch)[i]]
        r = self.records[index]
        render_epoch = epoch + copy * REPEAT_EPOCH_STRIDE  # each copy its own phantom render
        images = study_images(
            r,
            size=self.image_size,
            seed=self.seed,
            epoch=render_epoch,
            source=self.image_source,
            root=self.root,
        )
        return Example(images, r.language, r.report, r.record_id, {"source": r.source})

    def image_counts(self, positions: int) -> dict[str, int]:
        """How many of stream positions 0..positions-1 were fed real files and how many phantoms:
        {"real": n, "phantom": m}, counted per position with the rule `study_images` applies
        (`image_kind`). A record's kind does not change between epochs, so each full epoch adds
        the whole corpus's counts and the last, partial one its permutation's first positions."""
        kinds = [image_kind(self.records[i], self.image_source, self.root) for i, _ in self.entries]
        full, rest = divmod(positions, len(self.entries))
        counts = {"real": 0, "phantom": 0}
        for k in kinds:
            counts[k] += full
        for i in self._perm(full)[:rest] if rest else []:
            counts[kinds[i]] += 1
        return counts

    def batch(self, start: int, size: int) -> Batch:
        return collate(
            [self.example(k) for k in range(start, start + size)],
            self.tokenizer,
            self.processor,
            self.tokens_per_image,
            max_response=self.max_response,
            multiple_of=self.multiple_of,
        )


REPEAT_EPOCH_STRIDE = (
    1_000_003  # phantom epoch of copy c in epoch e: e + c * stride (no clash with real epochs)
)


def has_abnormal_finding(record) -> bool:
    """True when the labeler found a positive observation other than `no_finding` in the report
    (`record.labels`, written by `echocxr data build`)."""
    return any(
        obs != "no_finding" and isinstance(a, dict) and a.get("status", "positive") == "positive"
        for obs, a in (record.labels or {}).items()
    )


def image_kind(record, source: str, root: Path | None) -> str:
    """ "real" or "phantom": what `study_images(record, source=source, root=root)` returns for the
    frontal view the stream asks for (the same `real_image_paths` test: a real file exists)."""
    from echocxr.data.images import real_image_paths

    if source == "phantom":
        return "phantom"
    return "real" if real_image_paths(record, ("frontal",), root) is not None else "phantom"


TRAINED_ON = ("phantom", "real", "mixed")  # the checkpoint metadata's `trained_on` values


def image_provenance(inherited: dict, stage: str, counts: dict[str, int] | None) -> dict:
    """The `trained_on` and `image_counts` keys of a stage's echocxr.json (read by `echocxr serve`).

    inherited: the --init checkpoint's metadata ({} for a preset). counts: this stage's
    `StudyStream.image_counts` of the positions it trained on, None for a stage that draws its own
    images and does not count them (DCD: its images are not in `image_counts`). `image_counts`
    maps each counted stage to its counts, carried forward stage to stage; `trained_on` is
    "real" / "phantom" when every counted image was of that kind, "mixed" when both occur, and
    absent when nothing was counted.
    """
    per_stage = dict(inherited.get("image_counts") or {})
    per_stage[stage] = counts
    real = sum(c["real"] for c in per_stage.values() if c)
    phantom = sum(c["phantom"] for c in per_stage.values() if c)
    out: dict = {"image_counts": per_stage}
    if real or phantom:
        out["trained_on"] = "mixed" if real and phantom else ("real" if real else "phantom")
    return out


class _MicroBatches(torch.utils.data.Dataset):
    """Item j = the j-th micro-batch (counted from step 0) of this rank."""

    def __init__(self, stream: StudyStream, layout: Layout):
        self.stream, self.layout = stream, layout

    def __len__(self) -> int:  # never exhausted: the sampler bounds the range
        return 2**62

    def __getitem__(self, j: int) -> Batch:
        step, micro = divmod(j, self.layout.grad_accum)
        return self.stream.batch(self.layout.start(step, micro), self.layout.batch_size)


def _keep(x):
    return x


def micro_batches(stream: StudyStream, layout: Layout, first_step: int, last_step: int, workers: int = 0):
    """Micro-batches of steps first_step..last_step-1 in order (`grad_accum` per step). With
    workers > 0, DataLoader processes render and tokenize ahead of the training step."""
    order = range(first_step * layout.grad_accum, last_step * layout.grad_accum)
    ds = _MicroBatches(stream, layout)
    if workers <= 0:
        return (ds[j] for j in order)
    return iter(
        torch.utils.data.DataLoader(
            ds, batch_size=None, sampler=order, num_workers=workers, collate_fn=_keep, prefetch_factor=4
        )
    )
