"""Reports for a whole archive: sharded over torchrun ranks, resumable, merged by rank 0.

Used by `echocxr generate --studies` (here) and `echocxr eval` (its decode loop):
- `join` enters torch.distributed with training's `init_distributed` (gloo whatever the decode
  device: only control messages cross ranks, never tensors); one process is world 1.
- `deal` splits the work: items sorted by cost (prompt length, longest first), cut into batches,
  batch j to rank j mod world. The batches depend on the work list only, not on the world, so
  at temperature 0 a 1-process and an N-process run decode the very same batches.
- `ShardedRows`: each rank appends its rows to its own JSONL file as it goes (world 1: the final
  file itself); a killed run's rows are read back on restart (a torn last line is decoded again)
  and rank 0 merges every file into the final one, ordered as the input, without duplicates.
Files live in one folder that every rank sees (a shared filesystem across nodes).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path

from echocxr.distributed import Dist, barrier, init_distributed
from echocxr.errors import UserError

PARTS = "parts"
SETTINGS = "settings.json"
REPORTS = "reports.jsonl"
SKIPPED = "skipped.jsonl"
RUN_LOG = "run.json"  # the last run's world, studies decoded, decode and merge seconds (bench)


# -- ranks ------------------------------------------------------------------------------------------


def join() -> Dist:
    """This process's rank and world (torchrun's environment; world 1 without it)."""
    return init_distributed("cpu")  # gloo: barriers and small objects only


def leave(d: Dist) -> None:
    barrier(d)
    if d.world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()


def rank_device(name: str, d: Dist) -> str:
    """`--device` for this rank: auto/cuda -> cuda:LOCAL_RANK under torchrun."""
    import torch

    from echocxr.decode.cli import resolve_device

    name = resolve_device(name)
    if name == "cuda" and d.world > 1:
        name = f"cuda:{d.local_rank}"
    if name.startswith("cuda"):
        torch.cuda.set_device(torch.device(name))
    return name


def on_main(d: Dist, fn: Callable[[], object]):
    """fn() on rank 0, its result on every rank; a UserError there is raised on every rank."""
    if d.world == 1:
        return fn()
    import torch.distributed as dist

    box: list = [None]
    if d.main:
        try:
            box[0] = ("ok", fn())
        except UserError as e:
            box[0] = ("error", str(e))
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise UserError(value)
    return value


def deal(costs: list[int], batch_size: int, rank: int, world: int) -> list[list[int]]:
    """This rank's batches of indices into `costs`: longest first, batch j to rank j % world."""
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return batches[rank::world]


def prompt_lengths(tokenizer, tokens_per_image: int) -> Callable[[int, str], int]:
    """(images, language) -> prompt tokens (the cost `deal` sorts by), cached."""
    from echocxr.model.prompt import prompt_ids

    cache: dict = {}

    def length(n_images: int, language: str) -> int:
        if (n_images, language) not in cache:
            cache[n_images, language] = len(prompt_ids(tokenizer, n_images, tokens_per_image, language))
        return cache[n_images, language]

    return length


# -- files --------------------------------------------------------------------------------------------


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def read_rows(path: Path) -> list[dict]:
    """The JSON lines of `path` ([] when absent). A torn last line (a kill mid-write) is left out;
    a bad line elsewhere is a UserError."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines):  # no newline after it: the write was cut
                continue
            raise UserError(f"{path}:{i}: not a JSON line; delete the file to start over") from None
    return rows


def _trim_torn_tail(path: Path) -> None:
    if not path.is_file():
        return
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep < len(data):
        print(f"{path}: dropping an incomplete last line (interrupted run)", file=sys.stderr)
        with path.open("r+b") as f:
            f.truncate(keep)


class ShardedRows:
    """Rows with a unique `key`, appended per rank and merged into `final` by rank 0.

    keep: which rows of `final` count (the skip log also holds rows that are not this log's).
    in_parts: this rank writes under parts/ even in world 1 (`final` is written by the merge only).
    """

    def __init__(self, final: Path, key: str, d: Dist, *, keep=None, in_parts: bool = False):
        self.final, self.key, self.d = Path(final), key, d
        self.keep = keep or (lambda row: True)
        self.parts = self.final.parent / PARTS
        self.mine = (
            self.final
            if d.world == 1 and not in_parts
            else self.parts / f"{self.final.stem}.rank{d.rank}.jsonl"
        )

    def part_files(self) -> list[Path]:
        return sorted(self.parts.glob(f"{self.final.stem}.rank*.jsonl"))

    def collect(self) -> dict[str, dict]:
        """key -> row over the final file and every rank's part (first one kept)."""
        rows: dict[str, dict] = {}
        for path in [self.final, *self.part_files()]:
            for row in read_rows(path):
                if (path != self.final or self.keep(row)) and row[self.key] not in rows:
                    rows[row[self.key]] = row
        return rows

    def open(self):
        """This rank's file for appending (a torn last line cut off first)."""
        self.mine.parent.mkdir(parents=True, exist_ok=True)
        _trim_torn_tail(self.mine)
        return AppendLog(self.mine)

    def remove_parts(self) -> None:
        for p in self.part_files():
            p.unlink()
        if self.parts.is_dir() and not any(self.parts.iterdir()):
            self.parts.rmdir()


class AppendLog:
    """One JSON line per row, each written whole and on disk before `write` returns."""

    def __init__(self, path: Path):
        self.f = path.open("a", encoding="utf-8")

    def write(self, rows: Iterable[dict]) -> None:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        if text:
            self.f.write(text)
            self.f.flush()
            os.fsync(self.f.fileno())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def ordered(rows: dict[str, dict], order: list[str]) -> list[dict]:
    """Rows in input order; rows of keys no longer in the input after them, sorted by key."""
    known = [rows[k] for k in order if k in rows]
    extra = [rows[k] for k in sorted(set(rows) - set(order))]
    return known + extra


def weights_digest(ckpt: Path) -> str:
    """Names, sizes and mtimes of the weight files: a retrained checkpoint in the same folder differs."""
    h = hashlib.sha1()
    for p in sorted(Path(ckpt).glob("*.safetensors")):
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


def check_settings(path: Path, fingerprint: dict) -> None:
    """Write the settings, or check that those already there match (resume)."""
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise UserError(
                f"{path}: unreadable settings; delete {path.parent} or choose another --out"
            ) from None
        if old != fingerprint:
            diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
            raise UserError(
                f"{path.parent} holds outputs of other settings ({', '.join(diff)} differ); "
                "choose another --out or delete it"
            )
    else:
        write_atomic(path, json.dumps(fingerprint, indent=2) + "\n")


# -- echocxr generate --studies -----------------------------------------------------------------------


def _plan(args, views):
    """Rank 0: discover the studies, pick each one's images for `views`, check --sr-out.
    Returns (usable [(study, used, unused)], skips as rows)."""
    from echocxr.data.studies import discover, select_views

    found = discover(args.studies)
    skips = [
        {"path": s.path, "study_id": s.study_id, "stage": "discover", "reason": s.reason}
        for s in found.skipped
    ]
    usable = []
    for study in found.studies:
        picked = select_views(study, views)
        if isinstance(picked, str):
            paths = ", ".join(im.path for im in study.images)
            skips.append({"path": paths, "study_id": study.id, "stage": "views", "reason": picked})
        else:
            usable.append((study, *picked))
    if args.sr_out:
        bad = [used for _, used, _ in usable if not all(im.dicom for im in used)]
        if bad:
            raise UserError(
                f"--sr-out: {len(bad)} of {len(usable)} studies have non-DICOM images (first: "
                f"{next(im.path for im in bad[0] if not im.dicom)}); a DICOM SR references its source "
                "images' SOP instances, so it needs DICOM sources"
            )
    if not usable:
        raise UserError(
            f"{args.studies}: no usable studies ({len(skips)} skipped, e.g. {skips[0]['reason'] if skips else 'none found'})"
        )
    return usable, skips


def _image_row(im, view: str) -> dict:
    row = {"path": im.path, "view": view, "view_source": im.view_source}
    if im.sop_instance_uid:
        row["sop_instance_uid"] = im.sop_instance_uid
    return row


def decode_studies(engine, items, views, sr=None) -> tuple[list[dict], list[dict]]:
    """One batch: items (study, used images, unused images, language) -> (report rows, load
    failures as skip-log rows). sr: an `sr.SRWriter`, written before its row is returned."""
    import torch

    from echocxr.batch import Example, collate
    from echocxr.data.images import load_image, prepare_image
    from echocxr.data.records import parse_report
    from echocxr.decode.cli import decoder_name

    model = engine.model
    ok, examples, failed = [], [], []
    for study, used, unused, language in items:
        try:
            ims = [prepare_image(load_image(im.path), model.config.image_size) for im in used]
        except UserError as e:
            paths = ", ".join(im.path for im in used)
            failed.append({"path": paths, "study_id": study.id, "stage": "load", "reason": str(e)})
            continue
        ok.append((study, used, unused, language))
        examples.append(Example(ims, language, record_id=study.id))
    if not examples:
        return [], failed
    batch = collate(examples, engine.tokenizer, engine.processor, model.config.image_tokens)
    t0 = time.perf_counter()
    res = engine.generate(batch.to(engine.device))
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) * 1e3 / len(examples)
    rows = []
    for (study, used, unused, language), toks in zip(ok, res.tokens, strict=True):
        row = {
            "study_id": study.id,
            "language": language,
            "images": [_image_row(im, v) for im, v in zip(used, views, strict=True)],
            **parse_report(engine.text(toks)),
            "decoder": decoder_name(engine.cfg),
            "tokens": len(toks),
            "forwards": int(res.forwards),
            "batch_size": len(examples),
            "ms": round(ms, 2),
        }
        if unused:
            row["unused_images"] = [im.path for im in unused]
        if sr is not None:  # before the row: a row on disk means its SR is too
            sr.write(row, used)
        rows.append(row)
    return rows, failed


def run_studies(args: argparse.Namespace) -> int:
    """`echocxr generate --studies X --out DIR` (under torchrun: one shard per rank)."""
    import torch
    from tqdm import tqdm

    from echocxr.decode.cli import decode_overrides
    from echocxr.decode.engine import Engine

    if args.batch_size < 1 or not args.out:
        raise UserError("--studies needs --out DIR, and --batch-size must be at least 1")
    d = join()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = rank_device(args.device, d)
    out = Path(args.out)
    engine = Engine.from_checkpoint(args.ckpt, device=device, **decode_overrides(args))
    cfg, model = engine.cfg, engine.model
    views = tuple(engine.meta.get("views") or ("frontal",))
    default_language = args.language or "en"
    fingerprint = {
        "studies": str(Path(args.studies).resolve()),
        "ckpt": str(Path(args.ckpt).resolve()),
        "ckpt_weights": weights_digest(Path(args.ckpt)),
        "decode": asdict(cfg),
        "views": list(views),
        "language": default_language,
        "sr_out": str(Path(args.sr_out).resolve()) if args.sr_out else None,
    }
    reports = ShardedRows(out / REPORTS, "study_id", d)
    failures = ShardedRows(
        out / SKIPPED, "study_id", d, keep=lambda r: r.get("stage") == "load", in_parts=True
    )

    def start():
        out.mkdir(parents=True, exist_ok=True)
        check_settings(out / SETTINGS, fingerprint)
        usable, skips = _plan(args, views)
        failed_before = list(failures.collect().values())  # kept in the log: not retried
        done = set(reports.collect()) | {f["study_id"] for f in failed_before}
        log = skips + failed_before
        write_atomic(out / SKIPPED, "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in log))
        return usable, skips, done

    usable, skips, done = on_main(d, start)
    t_start = time.perf_counter()  # every rank leaves on_main together
    todo = [u for u in usable if u[0].id not in done]
    length = prompt_lengths(engine.tokenizer, model.config.image_tokens)
    lang = [u[0].language or default_language for u in todo]
    batches = deal([length(len(u[1]), la) for u, la in zip(todo, lang)], args.batch_size, d.rank, d.world)
    sr = None
    if args.sr_out:
        from echocxr.decode.sr import SRWriter

        sr = SRWriter(Path(args.sr_out), model_name=str(Path(args.ckpt).resolve()), fingerprint=fingerprint)
    with (
        reports.open() as rf,
        failures.open() as ff,
        tqdm(
            total=sum(map(len, batches)),
            desc=f"rank {d.rank}/{d.world}" if d.world > 1 else "generate",
            unit="study",
            disable=args.quiet,
            file=sys.stderr,
        ) as bar,
    ):
        for idx in batches:
            rows, failed = decode_studies(engine, [(*todo[i], lang[i]) for i in idx], views, sr)
            ff.write(failed)
            rf.write(rows)
            bar.update(len(idx))
    barrier(d)
    if d.main:
        t0 = time.perf_counter()
        order = [u[0].id for u in usable]
        merged = ordered(reports.collect(), order)
        failed = ordered(failures.collect(), order)
        write_atomic(out / REPORTS, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in merged))
        write_atomic(out / SKIPPED, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in skips + failed))
        reports.remove_parts()
        failures.remove_parts()
        merge_s = time.perf_counter() - t0
        run_log = {
            "world": d.world,
            "studies_decoded": len(todo),
            "decode_seconds": round(t0 - t_start, 4),
            "merge_seconds": round(merge_s, 4),
            "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        }
        write_atomic(out / RUN_LOG, json.dumps(run_log) + "\n")
        note = f"; SRs in {args.sr_out}" if args.sr_out else ""
        print(
            f"wrote {len(merged)} reports to {out / REPORTS} ({len(skips) + len(failed)} files or studies "
            f"skipped, with the reason, in {out / SKIPPED}{note}; merge {merge_s:.2f} s)",
            file=sys.stderr,
        )
    leave(d)
    return 0
