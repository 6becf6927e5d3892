"""`echocxr bench generate`: archive throughput of `echocxr generate --studies`, one JSON line.

Renders --studies phantom studies (the checkpoint's views, from the records of --corpus in turn)
to PNG files and a CSV manifest, then runs the real command twice in subprocesses:
- 1 process with --threads T (default 2);
- torchrun with --ranks R gloo processes (default 2) with T/R threads each;
- 1 process with T/R threads (one rank alone: `scaling_efficiency` = sharded rate / (R x its rate)).
studies/s = studies / decode seconds (each run's run.json: image loading + decoding, after the
model is loaded); merge_pct = rank 0's merge seconds as a percentage of decode + merge seconds;
`same_reports`: the two runs wrote the same reports (timing fields aside).

`estimate` (tested) turns that line, and optionally `bench decode` lines (e.g. the 7B shape on a
GPU), into studies/s and hours for an archive: per-rank rate x ranks (shards share nothing but
the merge), and per GPU batch_size / latency_per_report_s of the largest batch measured per
decoder. `--estimate FILE` prints it for a saved line without running anything.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from echocxr.errors import UserError

ARCHIVE_STUDIES = 100_000
RANKS = (1, 8, 16)  # one GPU, one 8-GPU node, two nodes


def _rate_row(rate: float, ranks: int, studies: int) -> dict:
    return {
        "ranks": ranks,
        "studies_per_s": round(rate * ranks, 3),
        "hours": round(studies / (rate * ranks) / 3600, 3),
    }


def estimate(bench: dict | None, decode_rows=(), *, studies: int = ARCHIVE_STUDIES, ranks=RANKS) -> dict:
    """Studies/s and hours for `studies` studies on each rank count in `ranks`.

    bench: a `bench generate` line (`per_rank` from its sharded run: studies_per_s / ranks).
    decode_rows: `bench decode` lines; per decoder label (ar, onestep, onestep-unfused, block) the
    row with the largest batch gives reports/s per GPU = batch_size / latency_per_report_s.
    Both scale linearly with ranks; the merge (a few seconds, measured) is left out.
    """
    out: dict = {"studies": studies}
    if bench is not None:
        per_rank = bench["sharded"]["studies_per_s"] / bench["sharded"]["ranks"]
        out["measured"] = {
            "per_rank_studies_per_s": round(per_rank, 3),
            "device": bench["device"],
            "scaling": [_rate_row(per_rank, r, studies) for r in ranks],
        }
    best: dict[str, dict] = {}
    for row in decode_rows:
        if row.get("bench") != "decode":
            continue
        label = row["decoder"] + ("-unfused" if row["decoder"] == "onestep" and not row["fused"] else "")
        if label not in best or row["batch_size"] > best[label]["batch_size"]:
            best[label] = row
    for label, row in sorted(best.items()):
        per_gpu = row["batch_size"] / row["latency_per_report_s"]
        out[label] = {
            "model": row["model"],
            "device": row["device"],
            "batch_size": row["batch_size"],
            "reports_per_s_per_device": round(per_gpu, 3),
            "scaling": [_rate_row(per_gpu, r, studies) for r in ranks],
        }
    if "ar" in best and "onestep" in best:
        out["onestep_vs_ar"] = round(
            out["onestep"]["reports_per_s_per_device"] / out["ar"]["reports_per_s_per_device"], 3
        )
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", help="a trained checkpoint (e.g. runs/demo/dcd_b8/final)")
    p.add_argument(
        "--corpus", help="records whose phantoms become the studies (e.g. runs/demo/data/eval_en.jsonl)"
    )
    p.add_argument("--studies", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2, help="threads of the 1-process run (split over ranks)")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--work", help="folder for the studies and outputs (default: a temporary one)")
    p.add_argument(
        "--decode-json", help="`bench decode` JSON lines to add to the estimate (e.g. 7B on a GPU)"
    )
    p.add_argument("--estimate", help="a saved `bench generate` line: print its estimate only")
    p.add_argument("--archive-studies", type=int, default=ARCHIVE_STUDIES)


def _read_lines(path: str) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: file not found")
    try:
        return [json.loads(x) for x in p.read_text().splitlines() if x.strip()]
    except json.JSONDecodeError as e:
        raise UserError(f"{p}: not JSON lines ({e})") from None


def _write_studies(args, work: Path, views, size: int) -> Path:
    from echocxr.data.images import study_images
    from echocxr.data.phantom import MAX_SIZE, MIN_SIZE
    from echocxr.data.records import load_corpus

    records = load_corpus(args.corpus)
    if not records:
        raise UserError(f"{args.corpus}: no records")
    size = min(max(size, MIN_SIZE), MAX_SIZE)
    lines = ["study_id,path,view"]
    (work / "png").mkdir(parents=True, exist_ok=True)
    for i in range(args.studies):
        rec = records[i % len(records)]
        for view, im in zip(
            views, study_images(rec, size=size, seed=i, source="phantom", views=views), strict=True
        ):
            path = work / "png" / f"{i:05d}_{view}.png"
            im.save(path)
            lines.append(f"B{i:05d},{path},{'PA' if view == 'frontal' else 'LATERAL'}")
    manifest = work / "studies.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def _run(cmd: list[str], threads: int) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise UserError(f"`{' '.join(cmd)}` failed: {done.stderr.strip().splitlines()[-1:]}")
    return time.perf_counter() - t0


def _measured(out: Path, wall: float, n: int) -> dict:
    log = json.loads((out / "run.json").read_text())
    total = log["decode_seconds"] + log["merge_seconds"]
    return {
        "ranks": log["world"],
        "threads_per_rank": log["threads"],
        "studies_per_s": round(n / log["decode_seconds"], 3),
        "decode_s": log["decode_seconds"],
        "merge_s": log["merge_seconds"],
        "merge_pct": round(100 * log["merge_seconds"] / total, 3),
        "wall_s": round(wall, 2),  # subprocess start to exit: interpreter, model load, discovery too
    }


def _reports(out: Path) -> list:
    rows = [json.loads(x) for x in (out / "reports.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "ms"} for r in rows]


def run(args) -> int:
    decode_rows = _read_lines(args.decode_json) if args.decode_json else []
    if args.estimate:
        bench = _read_lines(args.estimate)[-1]
        print(json.dumps(estimate(bench, decode_rows, studies=args.archive_studies)))
        return 0
    if not args.ckpt or not args.corpus:
        raise UserError("--ckpt and --corpus are needed to measure (or pass --estimate FILE)")
    if args.studies < 1 or args.ranks < 1 or args.threads < args.ranks:
        raise UserError("--studies and --ranks must be >= 1, --threads >= --ranks")
    from echocxr.bench.decode import _device_name
    from echocxr.model.vlm import EchoVLM

    _, _, _, meta = EchoVLM.from_pretrained(args.ckpt, device="cpu")
    views = tuple(meta.get("views") or ("frontal",))
    size = int(meta["model"]["image_size"])
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_generate_"))
    manifest = _write_studies(args, work, views, size)
    common = ["generate", "--ckpt", args.ckpt, "--studies", str(manifest), "--quiet"]
    common += ["--batch-size", str(args.batch_size), "--device", "cpu"]
    one_out, many_out, rank_out = work / "one", work / "sharded", work / "one_rank"
    for out in (one_out, many_out, rank_out):  # a fresh measurement, not a resume
        for name in ("reports.jsonl", "skipped.jsonl", "settings.json", "run.json"):
            (out / name).unlink(missing_ok=True)
    t = args.threads // args.ranks
    wall1 = _run(
        [sys.executable, "-m", "echocxr", *common, "--out", str(one_out), "--threads", str(args.threads)],
        args.threads,
    )
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(args.ranks),
    ]
    wall2 = _run([*torchrun, "-m", "echocxr", *common, "--out", str(many_out), "--threads", str(t)], t)
    wall3 = _run([sys.executable, "-m", "echocxr", *common, "--out", str(rank_out), "--threads", str(t)], t)
    one, many = _measured(one_out, wall1, args.studies), _measured(many_out, wall2, args.studies)
    alone = _measured(rank_out, wall3, args.studies)
    row = {
        "bench": "generate",
        "model": args.ckpt,
        "studies": args.studies,
        "views": list(views),
        "batch_size": args.batch_size,
        "one_process": one,
        "sharded": many,
        "one_rank_alone": alone,
        "sharded_vs_one": round(many["studies_per_s"] / one["studies_per_s"], 3),
        "scaling_efficiency": round(many["studies_per_s"] / (args.ranks * alone["studies_per_s"]), 3),
        "same_reports": _reports(one_out) == _reports(many_out) == _reports(rank_out),
        "device": _device_name("cpu"),
        "load_1min": round(os.getloadavg()[0], 2),  # a shared machine: other jobs' load, at the end
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "work": str(work),
    }
    row["estimate"] = estimate(row, decode_rows, studies=args.archive_studies)
    print(json.dumps(row, ensure_ascii=False), flush=True)
    return 0
