"""Regenerate docs/DCD.md's ablation table from a finished pipeline run (issue #20, item 4).

    .venv/bin/python scripts/dcd_ablation.py --run runs/demo [--block 8] [--out runs/demo/ablation]
        [--variants default,no_step_weight,...] [--write docs/DCD.md]

Each variant is the run's own DCD command (read from its done-marker, so the teacher, corpus, steps,
rounds and seed are the pipeline's) with the variant's flags added, trained into --out/<variant>,
then evaluated with the fused one-step decoder on the run's held-out EN studies. Every row gives
abnF1@10, ROUGE-L and label_f1_micro, with the run's AR and undistilled one-step rows beside it.
A finished variant (its eval's aggregate.json) is not redone; a killed one resumes. With --write,
the table replaces the block between the ablation markers of that file.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from echocxr.cli import main as echocxr
from echocxr.errors import UserError

VARIANTS: dict[str, list[str]] = {
    "default": [],
    "no_step_weight": ["--no-step-weight"],
    "no_eos_loss": ["--no-eos-loss"],
    "teacher_confidence_threshold": ["--strategy", "confidence_threshold"],
    "teacher_sequential": ["--strategy", "sequential"],
    "one_round": ["--rounds", "1"],
    # not the paper's teacher: the run's Stage 1 AR model writes the trajectories left to right
    "teacher_ar": ["--teacher", "{run}/ar/final", "--teacher-decoder", "ar"],
    "teacher_ar_steps_x2": [
        "--teacher",
        "{run}/ar/final",
        "--teacher-decoder",
        "ar",
        "--steps",
        "{steps_x2}",
    ],
}
METRICS = ("phantom_abn_macro_f1@10", "rougeL_coco", "label_f1_micro")
START, END = "<!-- dcd-ablation:start -->", "<!-- dcd-ablation:end -->"


def recorded_argv(step_folder: Path) -> list[str]:
    """The `echocxr ...` argv a pipeline step ran, from its done-marker."""
    marker = step_folder / ".echocxr-done.json"
    if not marker.is_file():
        raise UserError(f"{marker}: missing; finish the pipeline run first (echocxr demo / run)")
    argv = shlex.split(json.loads(marker.read_text())["command"])
    if argv[:1] != ["echocxr"]:
        raise UserError(f"{marker}: not an echocxr command: {argv[:3]}")
    return argv[1:]


def with_option(argv: list[str], flag: str, value: str | None) -> list[str]:
    """argv with `flag` set to `value` (replaced where present, appended otherwise; value None:
    a bare flag)."""
    out = list(argv)
    if flag in out:
        i = out.index(flag)
        if value is None:
            return out
        out[i + 1] = value
        return out
    return out + ([flag] if value is None else [flag, value])


def variant_argv(base: list[str], flags: list[str], out: Path) -> list[str]:
    argv = with_option(base, "--out", str(out))
    i = 0
    while i < len(flags):
        takes_value = i + 1 < len(flags) and not flags[i + 1].startswith("--")
        argv = with_option(argv, flags[i], flags[i + 1] if takes_value else None)
        i += 2 if takes_value else 1
    return argv


def values(aggregate_file: Path) -> dict:
    m = next(iter(json.loads(aggregate_file.read_text())["metrics"].values()))
    return {k: m.get(k, {}).get("value") for k in METRICS}


def run_variant(name: str, flags: list[str], base: list[str], out: Path, eval_en: Path, block: int) -> dict:
    train_out, eval_out = out / name, out / f"{name}_eval"
    if not (eval_out / "aggregate.json").is_file():
        if not (train_out / "final" / "config.json").is_file():
            argv = variant_argv(base, flags, train_out) + ["--resume"]  # a fresh start when no OUT/ckpt
            print("[train]", "echocxr", shlex.join(argv), flush=True)
            if echocxr(argv) != 0:
                raise UserError(f"variant {name}: training failed")
        argv = ["eval", "--ckpt", str(train_out / "final"), "--corpus", str(eval_en), "--out", str(eval_out)]
        argv += ["--decoder", "onestep", "--block-size", str(block), "--batch-size", "32", "--quiet"]
        argv += ["--metrics", "rougeL_coco,label_f1,phantom_f1,phantom_grounding"]
        print("[eval]", "echocxr", shlex.join(argv), flush=True)
        if echocxr(argv) != 0:
            raise UserError(f"variant {name}: eval failed")
    return values(eval_out / "aggregate.json")


def table(rows: dict[str, dict], refs: dict[str, dict], command: str) -> str:
    head = "| variant | flags | " + " | ".join(METRICS) + " |"
    lines = [f"Command: `{command}`", "", head, "| --- " * (2 + len(METRICS)) + "|"]
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    for name, v in refs.items():
        lines.append(f"| {name} | (the run's own eval) | " + " | ".join(fmt(v[k]) for k in METRICS) + " |")
    for name, v in rows.items():
        flags = " ".join(VARIANTS[name]) or "(none: the run's DCD command)"
        lines.append(f"| DCD {name} | `{flags}` | " + " | ".join(fmt(v[k]) for k in METRICS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a finished `echocxr demo` / `echocxr run` folder")
    p.add_argument("--block", type=int, default=8)
    p.add_argument("--out", default=None, help="default: RUN/ablation_dcd_b<block>")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {list(VARIANTS)}")
    p.add_argument("--write", default=None, help="replace the marked ablation block of this file")
    args = p.parse_args(argv)
    try:
        run = Path(args.run)
        names = [v for v in args.variants.split(",") if v]
        unknown = [v for v in names if v not in VARIANTS]
        if unknown:
            raise UserError(f"unknown variant(s) {unknown}; known: {list(VARIANTS)}")
        out = Path(args.out or run / f"ablation_dcd_b{args.block}")
        base = recorded_argv(run / f"dcd_b{args.block}")
        eval_en = run / "data" / "eval_en.jsonl"
        steps_x2 = str(2 * int(base[base.index("--steps") + 1]))  # twice the run's DCD steps
        refs = {
            "AR": values(run / "eval" / "ar" / "aggregate.json"),
            "undistilled one-step": values(
                run / "eval" / f"rad_b{args.block}_onestep_undistilled" / "aggregate.json"
            ),
        }
        rows = {
            n: run_variant(
                n, [f.format(run=run, steps_x2=steps_x2) for f in VARIANTS[n]], base, out, eval_en, args.block
            )
            for n in names
        }
        command = "python scripts/dcd_ablation.py " + shlex.join(a for a in (argv or sys.argv[1:]))
        text = table(rows, refs, command)
        (out / "ablation.md").write_text(text + "\n")
        (out / "ablation.json").write_text(json.dumps({"refs": refs, "rows": rows}, indent=1))
        print(text)
        if args.write:
            doc = Path(args.write)
            body = doc.read_text()
            if START not in body or END not in body:
                raise UserError(f"{doc}: no {START} ... {END} block to replace")
            head, rest = body.split(START, 1)
            doc.write_text(head + START + "\n" + text + "\n" + END + rest.split(END, 1)[1])
            print(f"wrote the table into {doc}")
    except UserError as e:
        print(f"dcd_ablation: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
