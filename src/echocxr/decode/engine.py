"""A long-lived decode engine (issue #15 item 4): one object owns the model, its tokenizer and
image processor, the default `DecodeConfig`, the KV-cache buffers and the (graph-captured or
compiled) steps, and runs every decoder over them, call after call.

- `Step` is the one forward every decoder uses: Q new tokens made of whole blocks placed after the
  committed slots -> hidden states. AR is block size 1; the block decoder's denoise and commit
  forwards and the one-step decoder's (fused) forward are block size B.
- The engine keeps one `KVCache` per batch row count ("bucket"; rows are not padded up) and one
  `Step` per (rows, block size). A later call with the same rows reuses both (the prefill resets
  the cache's length and padding marks), so on CUDA the graph is captured once, not per call. A
  cache grows (and its steps are rebuilt) only when a call needs more slots than it has; slots
  are rounded up to `SLOT_QUANTUM` so prompts of slightly different lengths share one cache.
- `Run` is the state of one `generate` call that the decode loops (`ar.decode`, `block.decode`,
  `onestep.decode`) read and advance. Its `commit` is the one place tokens become output: it
  applies EOS and per-row maximums, builds `Output.tokens` and calls `on_commit`.
- `Run.pick` is the one place logits become tokens: the decoding guard (`common.guard`: the mask
  token and special tokens other than EOS at -inf) and then `common.sample`.

Rows that finish early leave the batch: their last event, marked finished, carries their whole
output (a server answers them at once), and the next forward first moves the unfinished rows'
committed KV into the engine's cache for that many rows (`Run._shrink`) and runs the step on them
only; the loops keep full-batch tensors (finished rows get zero hidden states and EOS tokens).
`Engine(compact=False)` keeps the full-batch path (every row computed to the end); the test
`test_finished_rows_leave_the_batch_with_the_same_tokens` checks both give the same tokens and
events at temperature 0 for every decoder. At temperature 0 each row's tokens depend only on its
own prompt (attention never crosses rows; tests/test_engine.py checks a row alone against the
same row in a batch of 4).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from echocxr.batch import Batch
from echocxr.decode import ar, block, onestep
from echocxr.decode.common import (
    SEED_MAX,
    SEED_MIN,
    Output,
    allocate_cache,
    banned_tokens,
    decode_mask,
    guard,
    prefill,
    row_generators,
    sample,
    text_positions,
)
from echocxr.decode.config import DecodeConfig
from echocxr.decode.graphs import GraphStep, StaticKV, compiled_step, full_capacity
from echocxr.errors import UserError
from echocxr.model.kvcache import KVCache

LOOPS = {"ar": ar.decode, "block": block.decode, "onestep": onestep.decode}
SLOT_QUANTUM = 64  # cache slots are allocated in multiples of this


@dataclass(frozen=True)
class CommitEvent:
    """What one forward committed (`Engine.generate(on_commit=...)`): for every row listed, its new
    token ids after EOS and max-token cut (a finished row's last event ends at its EOS).

    The event says all a server needs to answer a row the moment it finishes, before its
    batch-mates end: `totals[i]` is row `rows[i]`'s whole output so far (on its finished event,
    its final `Output.tokens` row), `prefill_ms` the batch's prefill time."""

    rows: list[int]  # batch rows that committed tokens in this forward
    tokens: list[list[int]]  # per such row, the newly committed ids
    finished: list[bool]  # per such row: it reached EOS or its max_new_tokens
    forwards: int  # forwards run so far in this call, prefill excluded
    elapsed_ms: float  # since the call started, prefill included
    totals: list[list[int]]  # per such row, every id committed so far (a copy, EOS included)
    prefill_ms: float  # wall time of this call's prefill (0.0 on the uncached reference path)


class Step:
    """step(ids [rows, Q], next_pos [rows], offset) -> hidden [rows, Q, D]: Q new tokens (whole
    blocks of `block`) at text offset `offset` after each row's prompt, keys/values written at the
    cache's committed length without committing them (the loop does). The mask is
    `layout.decode_mask` (with block 1, plain causal; padded prompt slots hidden).

    mode "eager": attend to the used slots only. "static": fixed shapes, attention over the whole
    cache capacity with a mask and KV written at a position tensor (`graphs.StaticKV`). "graph": the
    static step replayed as a CUDA graph (`graphs.GraphStep`, one capture per shape, kept across
    calls). "compile": the static step under torch.compile reduce-overhead. All compute the same
    thing; tests check static == eager on CPU and graph == eager on a GPU.
    """

    MODES = ("eager", "static", "graph", "compile")

    def __init__(self, model, cache: KVCache, block: int, mode: str):
        if mode not in self.MODES:
            raise ValueError(f"unknown step mode {mode!r}; choose one of {self.MODES}")
        self.model, self.cache, self.block, self.mode = model, cache, block, mode
        self.static_kv = StaticKV(cache)
        self.fast = None
        if mode == "static":
            self.fast = self._static
        elif mode == "graph":
            self.fast = GraphStep(self._static)
        elif mode == "compile":
            self.fast = compiled_step(self._static)

    def __call__(self, ids: torch.Tensor, next_pos: torch.Tensor, offset: int) -> torch.Tensor:
        cache, Q = self.cache, ids.shape[1]
        pos = text_positions(next_pos, offset, Q)  # [3, rows, Q]
        mask = decode_mask(cache.key_valid, cache.length, Q, self.block)  # [rows, 1, Q, length + Q]
        if self.fast is None:
            return self.model(self.model.embed(ids), pos, mask, cache=cache)
        start = torch.tensor([cache.length], device=ids.device)
        return self.fast(ids, pos, full_capacity(mask, cache.capacity), start)

    def _static(self, ids, pos, mask, start):
        return self.model(self.model.embed(ids), pos, mask, cache=self.static_kv, start=start)


class Run:
    """One `Engine.generate` call: what the decode loops read (model, cfg, first logits, cache)
    and advance (`forward`, `pick`, `commit`)."""

    def __init__(
        self, engine: Engine, batch: Batch, cfg: DecodeConfig, caps: list[int], seeds: list[int], on_commit
    ):
        self.engine, self.model, self.batch, self.cfg = engine, engine.model, batch, cfg
        self.rows, self.device = batch.size, engine.device
        self.eos, self.mask_id = self.model.special.eos, self.model.special.mask
        self.caps, self.n_tokens = caps, max(caps)
        self.on_commit = on_commit
        self.banned = engine.banned()
        self.seeds = seeds  # one per row: each row samples from its own generator
        self.gens = row_generators(seeds, self.device) if cfg.temperature > 0 else None
        self.out: list[list[int]] = [[] for _ in range(self.rows)]
        self.finished = [False] * self.rows
        self.done = torch.zeros(self.rows, dtype=torch.bool, device=self.device)  # = finished
        self.forwards = 0
        self.committed = 0  # response positions committed so far (the same for every row)
        self.trajectory = None  # the block decoder's record, when asked for
        self.cache: KVCache | None = None  # the buffers of the rows computed now (`active`)
        self.next_pos = self.first = None  # set by the prefill; next_pos: [len(active)]
        # finished rows leave the computed set (`forward`), except when a trajectory is recorded
        # (the DCD teacher's records stay those of the full-batch path)
        self.compact = engine.compact and not cfg.record_trajectory
        self.active = list(range(self.rows))  # batch rows the step computes, in cache-row order
        self.row_forwards = 0  # sum over forwards of the rows computed (stats: compute spent)
        self.prefill_ms = 0.0  # set by the prefill
        self.t0 = time.perf_counter()

    @property
    def all_done(self) -> bool:
        return all(self.finished)

    def forward(self, ids: torch.Tensor, offset: int, block: int) -> torch.Tensor:
        """ids [rows, Q] -> hidden [rows, Q, D]: one counted forward of the engine's step (see
        `Step`). With compaction, rows that have finished first leave the cache (`_shrink`) and
        the step runs on the others only; the finished rows' hidden states are zeros (their
        tokens are EOS whatever the loop picks from them: `commit`)."""
        self.forwards += 1
        if self.compact:
            keep = [r for r in self.active if not self.finished[r]]
            if keep and len(keep) < len(self.active):
                self._shrink(keep)
        n = len(self.active)
        self.row_forwards += n
        if n == self.rows:
            return self.engine.step(n, block)(ids, self.next_pos, offset)
        idx = torch.tensor(self.active, device=ids.device)
        h = self.engine.step(n, block)(ids[idx], self.next_pos, offset)  # [n, Q, D]
        full = h.new_zeros(self.rows, *h.shape[1:])
        full[idx] = h
        return full

    def _shrink(self, keep: list[int]) -> None:
        """Move the committed KV of the `keep` rows (a subset of `active`, same order) into the
        engine's cache for len(keep) rows; later forwards attend there. Slots past the committed
        length are not copied: every forward rewrites the slots it writes before reading them."""
        sel = torch.tensor([self.active.index(r) for r in keep], device=self.device)
        src, L = self.cache, self.cache.length
        dst = self.engine.cache(len(keep), src.capacity)
        dst.k[:, :, :, :L] = src.k[:, sel, :, :L]
        dst.v[:, :, :, :L] = src.v[:, sel, :, :L]
        dst.key_valid.fill_(True)
        dst.key_valid[:, : src.capacity] = src.key_valid[sel]
        dst.length = L
        self.cache, self.next_pos, self.active = dst, self.next_pos[sel], keep

    def pick(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [rows, ..., V] -> (tokens [rows, ...], confidence [rows, ...]): the guard, then
        `common.sample` with each row's own generator (finished rows draw nothing)."""
        c, gens = self.cfg, self.gens
        if gens is not None:
            gens = [None if fin else g for g, fin in zip(gens, self.finished, strict=True)]
        return sample(guard(logits, self.banned), c.temperature, c.top_k, c.top_p, gens)

    def commit(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [rows, n], the next n response tokens of every row -> the same with the rows that
        had already finished set to EOS (what the loop feeds on). Appends each unfinished row's
        tokens up to its EOS and its max to the output, and reports them to `on_commit`."""
        tokens = torch.where(self.done[:, None], self.eos, tokens)
        self.committed += tokens.shape[1]
        event_rows, event_tokens, event_fin = [], [], []
        for r, row in enumerate(tokens.tolist()):
            if self.finished[r]:
                continue
            new = row[: self.caps[r] - len(self.out[r])]
            if self.eos in new:
                new = new[: new.index(self.eos) + 1]
            self.out[r].extend(new)
            self.finished[r] = (bool(new) and new[-1] == self.eos) or len(self.out[r]) >= self.caps[r]
            event_rows.append(r)
            event_tokens.append(new)
            event_fin.append(self.finished[r])
        self.done = torch.tensor(self.finished, device=self.device)
        if self.on_commit is not None and event_rows:
            ms = (time.perf_counter() - self.t0) * 1e3
            totals = [list(self.out[r]) for r in event_rows]
            event = CommitEvent(
                event_rows, event_tokens, event_fin, self.forwards, ms, totals, self.prefill_ms
            )
            self.on_commit(event)
        return tokens


class Engine:
    """Decode batches with one model, reusing caches and compiled steps across calls.

    Engine(model, cfg, device=...) wraps a loaded model (tokenizer/processor optional: without a
    tokenizer the guard bans only `model.special`'s ids other than EOS). `from_checkpoint` loads
    a checkpoint and builds its default DecodeConfig (`DecodeConfig.from_checkpoint`).
    mode: the step mode (`Step.MODES`); default "graph" on CUDA, "eager" elsewhere.
    Not thread-safe: one `generate` at a time (the calls share the cache buffers).
    """

    def __init__(
        self,
        model,
        cfg: DecodeConfig | None = None,
        *,
        device: str | torch.device,
        tokenizer=None,
        processor=None,
        meta: dict | None = None,
        mode: str | None = None,
        compact: bool = True,
    ):
        self.device = torch.device(device)
        self.model = model.to(self.device)  # its train/eval mode is the caller's (from_checkpoint: eval)
        self.cfg = cfg or DecodeConfig()
        self.tokenizer, self.processor, self.meta = tokenizer, processor, meta or {}
        self.mode = mode or ("graph" if self.device.type == "cuda" else "eager")
        if self.mode not in Step.MODES:
            raise ValueError(f"unknown step mode {self.mode!r}; choose one of {Step.MODES}")
        self.caches: dict[int, KVCache] = {}  # rows -> buffers
        self.steps: dict[tuple[int, int], Step] = {}  # (rows, block) -> step over caches[rows]
        self.allocations = 0  # KV caches allocated so far (tests: reuse means this stays put)
        self.compact = compact  # finished rows leave the computed batch (Run.forward)
        self._banned: dict = {}

    @classmethod
    def from_checkpoint(
        cls, path, *, device: str | torch.device = "cpu", mode: str | None = None, **overrides
    ):
        """Load `path` (HF layout with echocxr.json) on `device`; overrides: DecodeConfig fields
        (None = the checkpoint's). Raises UserError for a folder without the model preset."""
        from echocxr.model.vlm import EchoVLM

        model, tokenizer, processor, meta = EchoVLM.from_pretrained(path, device=device)
        model.eval()
        if model.config is None:  # the prompt's image-token count comes from the preset
            raise UserError(f"{path}: no echocxr.json with the model preset (save it with echocxr train)")
        cfg = DecodeConfig.from_checkpoint(meta, model.config, **overrides)
        return cls(model, cfg, device=device, tokenizer=tokenizer, processor=processor, meta=meta, mode=mode)

    def banned(self) -> torch.Tensor:
        """The guard's bool [V] for the model's current special ids (a bench may redefine EOS)."""
        key = self.model.special
        if key not in self._banned:
            self._banned[key] = banned_tokens(self.model, self.tokenizer)
        return self._banned[key]

    def cache(self, rows: int, slots: int) -> KVCache:
        """The KV buffers for `rows` rows with at least `slots` slots (allocated or grown here only)."""
        have = self.caches.get(rows)
        if have is None or have.capacity < slots:
            capacity = -(-slots // SLOT_QUANTUM) * SLOT_QUANTUM
            self.caches[rows] = allocate_cache(self.model, rows, capacity)
            self.allocations += 1
            self.steps = {k: s for k, s in self.steps.items() if k[0] != rows}  # they captured the old one
        return self.caches[rows]

    def step(self, rows: int, block: int) -> Step:
        if (rows, block) not in self.steps:
            self.steps[rows, block] = Step(self.model, self.caches[rows], block, self.mode)
        return self.steps[rows, block]

    @torch.no_grad()
    def generate(
        self,
        batch: Batch,
        cfg: DecodeConfig | None = None,
        on_commit: Callable[[CommitEvent], None] | None = None,
        *,
        max_new_tokens_per_row: list[int] | None = None,
        seeds: list[int] | None = None,
        reference: bool = False,
    ) -> Output:
        """Decode every row of `batch` (moved to the engine's device) with `cfg` (default
        `self.cfg`). max_new_tokens_per_row: a cap per row (default cfg.max_new_tokens for all).
        reference: the uncached slow path of the block decoder (tests). Output.stats carries
        `prefill_s` (wall time of the prefill, CUDA-synchronized) and `mode`. Raises UserError for
        per-row caps of the wrong length or below 1."""
        cfg = cfg or self.cfg
        batch = batch.to(self.device)
        caps = max_new_tokens_per_row or [cfg.max_new_tokens] * batch.size
        if len(caps) != batch.size or min(caps) < 1:
            raise UserError(
                f"max_new_tokens_per_row needs {batch.size} values >= 1, got {max_new_tokens_per_row}"
            )
        seeds = [cfg.seed] * batch.size if seeds is None else list(seeds)
        if len(seeds) != batch.size or not all(SEED_MIN <= s <= SEED_MAX for s in seeds):
            raise UserError(f"seeds needs {batch.size} integers in {SEED_MIN}..{SEED_MAX}, got {seeds}")
        if reference and cfg.decoder != "block":
            raise ValueError("the uncached reference path exists for the block decoder only")
        run = Run(self, batch, cfg, list(caps), seeds, on_commit)
        prefill_s = None
        if not reference:
            B = 1 if cfg.decoder == "ar" else cfg.block_size
            P = batch.prompt_ids.shape[1]
            # + one block: the fused one-step forward places its mask block past the committed one
            cache = self.cache(batch.size, P + -(-run.n_tokens // B) * B + B)
            pre = prefill(self.model, batch, cache=cache)
            if self.device.type == "cuda":  # the prefill's time, for decode-only numbers (bench)
                torch.cuda.synchronize(self.device)
            prefill_s = time.perf_counter() - run.t0
            run.prefill_ms = prefill_s * 1e3
            run.cache, run.next_pos, run.first = cache, pre.next_pos, pre.last_logits
        stats = block.decode(run, reference=True) if reference else LOOPS[cfg.decoder](run)
        stats = {
            "mode": "reference" if reference else self.mode,
            "prefill_s": prefill_s,
            "row_forwards": run.row_forwards,  # rows computed, summed over forwards (cached path)
            **stats,
        }
        return Output(run.out, run.forwards, run.trajectory, stats)

    def text(self, tokens: list[int]) -> str:
        """One row's tokens -> its text, without the final EOS. Raises RuntimeError if a banned id
        (mask, special other than EOS) is present: the guard makes that impossible, so it is a bug,
        never silently dropped."""
        if self.tokenizer is None:
            raise ValueError("this engine has no tokenizer (build it with Engine.from_checkpoint)")
        ids = tokens[:-1] if tokens and tokens[-1] == self.model.special.eos else tokens
        banned = self.banned()
        bad = sorted({t for t in ids if not 0 <= t < banned.numel() or bool(banned[t])})
        if bad:
            raise RuntimeError(
                f"decoded ids {bad} are mask/special tokens the decoding guard should have blocked"
            )
        return self.tokenizer.decode(ids, skip_special_tokens=False)
