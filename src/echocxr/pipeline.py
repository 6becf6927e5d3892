"""`echocxr run` and `echocxr demo`: the whole chain for one preset, from a fresh checkout to
docs/RESULTS.md.

    data build (normalized, and --no-normalize for the ablation)
    -> train AR -> RAD (per block size) -> DCD (per block size)   [+ the same on original reports]
    -> eval every decoder on the held-out phantom studies
    -> EOS-vs-content confidence, decode speed bench, reports for the real IU radiographs
    -> RESULTS.md with plots

Every step runs in this process through the same CLI entry point a user would type
(`echocxr.cli.main`), so each number on the results page carries the exact command. A step is
done when its folder holds a done-marker written after it succeeded, with the same command, newer
than the markers of the steps it depends on. A killed run therefore continues where it stopped:
an unfinished train step resumes from its last save (`--resume`), an unfinished eval from its
samples file. A step whose command or inputs changed is moved aside (`<folder>.stale-<time>`,
never deleted) and run again.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from echocxr.errors import UserError

DONE = ".echocxr-done.json"
# Grounding (issue #13): what every eval adds to the preset's metrics (and all that the
# image-blind controls score), and the headline number of the grounding table (docs/METRICS.md).
GROUNDING_METRICS: tuple[str, ...] = ("phantom_f1", "phantom_grounding")
GROUNDING_MIN_POSITIVES = 10  # issue #13's targets read the >= 10 macro-F1
GROUNDING_HEADLINE = f"phantom_abn_macro_f1@{GROUNDING_MIN_POSITIVES}"
GROUNDING_RANK: tuple[str, ...] = (GROUNDING_HEADLINE, "phantom_abn_macro_f1@5")
DEFAULT_IU = "../shared/data/iu/NLMCXR_reports.tgz"
DEFAULT_IMAGES = "../shared/data/iu/images"


@dataclass(frozen=True)
class PipelineConfig:
    """Step counts and eval sizes per preset: one source of defaults for `run` and `demo`."""

    name: str
    model: str  # model preset for --init of the AR stage
    ar_steps: int
    rad_steps: int
    dcd_steps: int
    batch_size: int
    lr: tuple[float, float, float] = (3e-4, 3e-4, 1e-4)  # AR, RAD, DCD
    vision_steps: int = 0  # Stage 0 (vision warm-start, docs/TRAINING.md) before AR; 0: none
    vision_lr: float = 3e-3
    vision_batch_size: int = 16  # Stage 0 steps are cheap (no language model): more images per step
    freeze_vision_ar: bool = False  # AR keeps the Stage 0 tower fixed (cheaper; RAD/DCD always do)
    warmup: int = 50
    distill_studies: int = 256  # DCD: studies the teacher decodes per round
    dcd_rounds: int = 1  # DCD: trajectory rounds, each on fresh studies (`--rounds`)
    # DCD's teacher: "rad" (the paper's: the RAD model's block decoder) or "ar" (the chain's Stage 1
    # model decoding left to right, `--teacher-decoder ar`; docs/DCD.md, "Ablations (issue #20)")
    dcd_teacher: str = "rad"
    dcd_strategy: str | None = None  # the RAD teacher's unmasking order (None: the decoders' default)
    workers: int = 0  # data-loading processes per train step (phantom rendering is CPU work)
    block_sizes: tuple[int, ...] = (4, 8)
    eval_limit: int | None = None  # studies per eval (None: the whole eval file)
    eval_zh_limit: int | None = None  # Chinese eval of the AR and final DCD models (0: none)
    eval_batch_size: int = 8
    eval_size: int = 2000  # `data build --eval-size` (studies per language in eval_*.jsonl)
    metrics: tuple[str, ...] = ("bleu_coco", "rougeL_coco", "cider_coco", "label_f1", "phantom_f1")
    quality_metric: str = "rougeL_coco"  # the Pareto plot's y axis
    ablation: bool = True  # also train AR -> RAD -> DCD on the original (not normalized) reports
    ablation_block: int = 4
    bench_batch_sizes: tuple[int, ...] = (1, 8)
    bench_new_tokens: int = 64
    log_every: int = 50

    def __post_init__(self) -> None:
        if min(self.ar_steps, self.rad_steps, self.dcd_steps, self.batch_size) < 1:
            raise UserError(f"pipeline preset {self.name}: steps and batch size must be >= 1")
        if self.dcd_rounds < 1 or self.distill_studies < 1:
            raise UserError(f"pipeline preset {self.name}: dcd_rounds and distill_studies must be >= 1")
        if self.dcd_teacher not in ("rad", "ar"):
            raise UserError(
                f"pipeline preset {self.name}: dcd_teacher must be rad or ar, not {self.dcd_teacher!r}"
            )
        if self.vision_steps < 0 or self.vision_batch_size < 1:
            raise UserError(f"pipeline preset {self.name}: vision_steps must be >= 0, vision_batch_size >= 1")
        if self.ablation and self.ablation_block not in self.block_sizes:
            raise UserError(f"pipeline preset {self.name}: ablation block {self.ablation_block} not trained")


PRESETS: dict[str, PipelineConfig] = {
    # CPU demo: must finish in <= 15 minutes on a 2-core box (docs/PIPELINE.md). The `mini` model sees
    # 168 px phantoms (36 image tokens) through a Stage 0 warm-started tower; the text ablation is
    # left to `base`, which has the time for it.
    "tiny": PipelineConfig(
        name="tiny",
        model="mini",
        vision_steps=2000,  # eval head AUROC 0.74 at 500, 0.85 at 2000 steps (docs/PIPELINE.md)
        freeze_vision_ar=False,  # AR trains the warm tower too: +0.06 macro-F1 for ~25% more AR time
        ar_steps=1800,  # on the 2000-step tower: abnormal macro-F1 0.218 at 900, 0.269 at 1800 (docs/PIPELINE.md)
        rad_steps=500,
        dcd_steps=200,
        batch_size=8,
        lr=(2e-3, 1e-3, 5e-4),
        warmup=50,
        distill_studies=128,
        dcd_rounds=4,  # fresh studies per round: one set of trajectories is memorised (docs/PIPELINE.md)
        # the only teacher whose student reaches the undistilled one-step grounding here (docs/DCD.md,
        # "Ablations (issue #20)"); not the paper's, and the results page says so
        dcd_teacher="ar",
        block_sizes=(8,),  # the headline block; `base` trains blocks 4 and 8
        ablation=False,
        eval_limit=None,  # all 200 EN eval studies: at 64, at most 3 findings reach 5 positives
        eval_zh_limit=32,
        eval_batch_size=32,
        eval_size=200,
        bench_batch_sizes=(1, 8),
        bench_new_tokens=32,
    ),
    # CPU, the whole chain with the ablation in <= 60 minutes on 2 cores (docs/PIPELINE.md).
    "base": PipelineConfig(
        name="base",
        model="base",
        vision_steps=2400,  # eval head AUROC 0.74 at 800, 0.85 at 2400 steps (docs/PIPELINE.md)
        freeze_vision_ar=True,
        ar_steps=2000,  # the ablation no longer repeats Stage 0 (--vision-from), which pays for this
        rad_steps=800,
        dcd_steps=600,  # with 4 rounds: block-8 F1 0.111 -> 0.175 on the 2026-11-30 teacher (docs/PIPELINE.md)
        batch_size=8,
        lr=(1e-3, 7e-4, 3e-4),
        warmup=50,
        distill_studies=256,
        dcd_rounds=4,
        dcd_teacher="ar",  # as `tiny` (measured on `tiny` only; docs/DCD.md)
        eval_limit=200,
        eval_zh_limit=64,
        eval_batch_size=32,
        eval_size=200,
        bench_batch_sizes=(1, 8),
        bench_new_tokens=64,
    ),
    # One H100: each train command inside 10 minutes.
    "small": PipelineConfig(
        name="small",
        model="small",
        ar_steps=4000,
        rad_steps=3000,
        dcd_steps=1500,
        batch_size=32,
        workers=8,  # ~400 renders/s per core at 112 px; 8 processes keep a 32-study step fed
        eval_limit=500,
        eval_zh_limit=250,
        eval_batch_size=32,
        eval_size=500,
        metrics=(
            "bleu_coco",
            "meteor_coco",
            "rougeL_coco",
            "cider_coco",
            "semscore_minilm",
            "label_f1",
            "phantom_f1",
        ),
        bench_batch_sizes=(1, 8, 32),
        bench_new_tokens=128,
    ),
}


def get_pipeline_preset(name: str, **overrides) -> PipelineConfig:
    if name not in PRESETS:
        raise UserError(f"unknown pipeline preset {name!r}; choose one of {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)


# ----------------------------------------------------------------------------------------------
# Steps and the done-markers


@dataclass
class Step:
    name: str  # "train/rad_b4"
    folder: Path  # holds the step's outputs and its done-marker
    command: str  # what a user types to redo it (recorded with every number)
    action: Callable[[bool], None]  # action(resume): does the work; raises on failure
    deps: tuple[str, ...] = ()
    info: dict = field(default_factory=dict)  # what RESULTS.md needs to label the step's output


def marker(folder: Path) -> dict | None:
    p = folder / DONE
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        return None  # a torn marker: the step did not finish cleanly


def _mark_done(step: Step, seconds: float) -> None:
    step.folder.mkdir(parents=True, exist_ok=True)
    data = {
        "step": step.name,
        "command": step.command,
        "seconds": round(seconds, 2),
        "finished": time.time(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    tmp = step.folder / (DONE + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, step.folder / DONE)


def status(steps: list[Step]) -> dict[str, str]:
    """Per step: "done", "partial" (folder without marker: resume it), "stale" (marker from another
    command or older than a dependency: move aside and redo) or "todo"."""
    by_name = {s.name: s for s in steps}
    out: dict[str, str] = {}
    finished: dict[str, float] = {}
    for s in steps:
        m = marker(s.folder)
        deps_ok = all(out.get(d) == "done" for d in s.deps if d in by_name)
        newest_dep = max((finished.get(d, 0.0) for d in s.deps), default=0.0)
        if m is not None and m.get("command") == s.command and deps_ok and m.get("finished", 0) >= newest_dep:
            out[s.name] = "done"
            finished[s.name] = m["finished"]
        elif m is not None:
            out[s.name] = "stale"
        elif s.folder.exists() and any(s.folder.iterdir()):
            out[s.name] = "partial"
        else:
            out[s.name] = "todo"
    return out


def execute(steps: list[Step], *, log=print) -> dict[str, float]:
    """Run every step that is not done, in order. Returns seconds per step run now."""
    ran: dict[str, float] = {}
    for s in steps:
        state = status(steps)[s.name]  # recomputed: an earlier step may just have finished
        if state == "done":
            log(f"[skip] {s.name}: done ({s.folder})")
            continue
        if state == "stale":
            aside = s.folder.with_name(f"{s.folder.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
            s.folder.rename(aside)
            log(f"[stale] {s.name}: command or inputs changed; old outputs moved to {aside}")
        log(f"[run] {s.name}: {s.command}" + ("  (resuming)" if state == "partial" else ""))
        t0 = time.perf_counter()
        s.action(state == "partial")
        dt = time.perf_counter() - t0
        _mark_done(s, dt)
        ran[s.name] = dt
        log(f"[done] {s.name} in {dt:.1f} s")
    return ran


# ----------------------------------------------------------------------------------------------
# The plan


def _cli(argv: list[str]) -> None:
    from echocxr.cli import main

    rc = main(argv)
    if rc != 0:
        raise UserError(f"`echocxr {' '.join(argv)}` failed (exit {rc}); rerun the pipeline to resume")


def _quote(argv: list[str]) -> str:
    import shlex

    return "echocxr " + " ".join(shlex.quote(a) for a in argv)


def checkpoint_dir(train_out: Path) -> Path:
    """The final checkpoint a train step wrote: its folder itself or `final/` in it."""
    for p in (train_out / "final", train_out):
        if (p / "config.json").is_file():
            return p
    return train_out / "final"


@dataclass(frozen=True)
class RunOptions:
    out: Path
    iu: Path
    images: Path | None
    device: str = "cpu"
    results: Path | None = None  # also write RESULTS.md (and figures/) here
    seed: int = 0


def plan(cfg: PipelineConfig, opt: RunOptions) -> list[Step]:
    """Every step of the run, in order, with its command and dependencies."""
    out = opt.out
    steps: list[Step] = []

    def cli_step(name, folder, argv, deps=(), resume_flag=None, **info):
        def action(resume: bool) -> None:
            _cli(argv + ([resume_flag] if resume and resume_flag else []))

        steps.append(Step(name, folder, _quote(argv), action, tuple(deps), info))

    variants = [("norm", out / "data", [])]
    if cfg.ablation:
        variants.append(("orig", out / "data_orig", ["--no-normalize"]))
    for tag, folder, extra in variants:
        cli_step(
            f"data/{tag}",
            folder,
            ["data", "build", "--iu", str(opt.iu), "--out", str(folder), "--eval-size", str(cfg.eval_size)]
            + ["--seed", str(opt.seed), "--cache-dir", str(out / "cache")]  # embeddings shared by both
            + extra,
        )

    def train(name, stage, init, data, steps_n, deps, block=None, extra=()):
        folder = out / name
        lr = cfg.vision_lr if stage == "vision" else cfg.lr[("ar", "rad", "dcd").index(stage)]
        argv = ["train", "--stage", stage, "--init", init, "--corpus", str(data / "corpus.jsonl")]
        batch = cfg.vision_batch_size if stage == "vision" else cfg.batch_size
        argv += ["--out", str(folder), "--steps", str(steps_n), "--batch-size", str(batch)]
        argv += ["--lr", str(lr), "--warmup", str(min(cfg.warmup, steps_n // 4))]
        argv += ["--device", opt.device, "--seed", str(opt.seed), "--log-every", str(cfg.log_every)]
        argv += ["--save-every", str(max(1, steps_n // 4))]
        if cfg.workers:
            argv += ["--workers", str(cfg.workers)]
        if block is not None:
            argv += ["--block-size", str(block)]
        if stage == "dcd":
            argv += ["--distill-studies", str(cfg.distill_studies), "--rounds", str(cfg.dcd_rounds)]
        if stage == "ar" and cfg.freeze_vision_ar:
            argv += ["--freeze-vision"]
        argv += list(extra)
        cli_step(f"train/{name}", folder, argv, deps, resume_flag="--resume", stage=stage, block=block)
        return folder

    trained: dict[str, Path] = {}
    for tag, data, _ in variants:
        sfx = "" if tag == "norm" else "_orig"
        ar_init, ar_deps, ar_extra = cfg.model, [f"data/{tag}"], []
        if cfg.vision_steps and tag == "norm":  # Stage 0 also fits the BPE that the chain then keeps
            vis = train("vision", "vision", cfg.model, data, cfg.vision_steps, [f"data/{tag}"])
            trained["vision"] = vis
            ar_init, ar_deps = str(checkpoint_dir(vis)), ["train/vision"]
        elif cfg.vision_steps:  # the ablation: the same Stage 0 tower, its own BPE (fitted by AR)
            ar_deps = [f"data/{tag}", "train/vision"]
            ar_extra = ["--vision-from", str(checkpoint_dir(trained["vision"]))]
        ar = train(f"ar{sfx}", "ar", ar_init, data, cfg.ar_steps, ar_deps, extra=ar_extra)
        trained[f"ar{sfx}"] = ar
        blocks = cfg.block_sizes if tag == "norm" else (cfg.ablation_block,)
        for B in blocks:
            rad = train(
                f"rad_b{B}{sfx}", "rad", str(checkpoint_dir(ar)), data, cfg.rad_steps, [f"train/ar{sfx}"], B
            )
            teacher: list[str] = []
            dcd_deps = [f"train/rad_b{B}{sfx}"]
            if cfg.dcd_teacher == "ar":
                teacher = ["--teacher", str(checkpoint_dir(ar)), "--teacher-decoder", "ar"]
                dcd_deps.append(f"train/ar{sfx}")
            elif cfg.dcd_strategy:
                teacher = ["--strategy", cfg.dcd_strategy]
            dcd = train(
                f"dcd_b{B}{sfx}",
                "dcd",
                str(checkpoint_dir(rad)),
                data,
                cfg.dcd_steps,
                dcd_deps,
                B,
                extra=teacher,
            )
            trained[f"rad_b{B}{sfx}"], trained[f"dcd_b{B}{sfx}"] = rad, dcd

    # Evals: every decoder on the normalized held-out set (the ablation models too: one fixed set
    # of references, so the ablation compares what the models learned, not two reference styles).
    eval_en = out / "data" / "eval_en.jsonl"
    eval_zh = out / "data" / "eval_zh.jsonl"

    from echocxr.eval.evaluate import CONTROL_SOURCES, EvalConfig, cli_args, evaluate

    # Every eval scores grounding (the results page leads with it); the controls score only
    # the phantom-truth metrics, which keeps their cost to decoding.
    main_metrics = tuple(dict.fromkeys((*cfg.metrics, *GROUNDING_METRICS)))

    def eval_config(model_key, folder, corpus=eval_en, limit=cfg.eval_limit, metrics=main_metrics, **dec):
        return EvalConfig(
            ckpt=str(checkpoint_dir(trained[model_key])),
            corpus=str(corpus),
            out=str(folder),
            batch_size=cfg.eval_batch_size,
            limit=limit,
            metrics=metrics,
            device=opt.device,
            seed=opt.seed,
            **dec,
        )

    def evaluation(label, model_key, corpus=eval_en, limit=cfg.eval_limit, group="main", info=None, **dec):
        folder = out / "eval" / re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")
        metrics = GROUNDING_METRICS if dec.get("image_source") in CONTROL_SOURCES else main_metrics
        ecfg = eval_config(model_key, folder, corpus, limit, metrics, **dec)
        deps = [f"train/{model_key}", "data/norm"]
        steps.append(
            Step(
                f"eval/{folder.name}",
                folder,
                "echocxr eval " + " ".join(cli_args(ecfg)),
                lambda resume: evaluate(ecfg, progress=True) and None,
                tuple(deps),
                {
                    "label": label,
                    "model": model_key,
                    "group": group,
                    "language": "zh" if corpus == eval_zh else "en",
                    **(info or {}),
                },
            )
        )

    def controls(label, model_key, **dec):
        """The image-blind controls of one real-phantom eval (same checkpoint and decoder)."""
        for src in CONTROL_SOURCES:
            evaluation(f"{label} [{src}]", model_key, group="control", image_source=src, **dec)

    def best_k_controls(B: int, ks: list[int]) -> None:
        """Controls of the RAD teacher at its best K, chosen when its K evals are done."""
        model_key = f"rad_b{B}"
        k_folders = {K: out / "eval" / f"rad_b{B}_block_k_{K}" for K in ks}
        for src in CONTROL_SOURCES:
            folder = out / "eval" / f"rad_b{B}_block_best_k_{src}"
            template = eval_config(
                model_key,
                folder,
                metrics=GROUNDING_METRICS,
                decoder="block",
                block_size=B,
                image_source=src,
            )

            def action(resume: bool, template=template, folder=folder) -> None:
                K = best_k(k_folders)
                ecfg = replace(template, steps=K)
                _set_aside_other_settings(folder, ecfg.fingerprint())
                evaluate(ecfg, progress=True)

            argv = cli_args(template) + ["--steps", f"<best of {ks}>"]
            steps.append(
                Step(
                    f"eval/{folder.name}",
                    folder,
                    f"(in-process, K = echocxr.pipeline.best_k by {GROUNDING_HEADLINE}) echocxr eval "
                    + " ".join(argv),
                    action,
                    (f"train/{model_key}", "data/norm", *(f"eval/{f.name}" for f in k_folders.values())),
                    {"label": f"rad_b{B} block best K [{src}]", "model": model_key, "group": "control"},
                )
            )

    B_main = max(cfg.block_sizes)
    evaluation("ar", "ar", decoder="ar", info={"per_finding": True, "role": "ar"})
    controls("ar", "ar", decoder="ar")
    for B in cfg.block_sizes:
        ks = sorted({k for k in (1, 2, 4, B) if k <= B})
        for K in ks:
            evaluation(f"rad_b{B} block K={K}", f"rad_b{B}", decoder="block", block_size=B, steps=K)
        best_k_controls(B, ks)
        undistilled = {"role": "onestep_undistilled", "block": B}
        evaluation(
            f"rad_b{B} onestep (undistilled)", f"rad_b{B}", decoder="onestep", block_size=B, info=undistilled
        )
        evaluation(
            f"dcd_b{B} onestep vanilla",
            f"dcd_b{B}",
            decoder="onestep",
            block_size=B,
            fused=False,
            info={"role": "onestep_dcd", "block": B},
        )
        evaluation(
            f"dcd_b{B} onestep fused",
            f"dcd_b{B}",
            decoder="onestep",
            block_size=B,
            info={"per_finding": B == B_main, "role": "onestep_dcd", "block": B},
        )
        controls(f"dcd_b{B} onestep fused", f"dcd_b{B}", decoder="onestep", block_size=B)
    if cfg.eval_zh_limit:
        evaluation("zh ar", "ar", corpus=eval_zh, limit=cfg.eval_zh_limit, group="zh", decoder="ar")
        evaluation(
            f"zh dcd_b{B_main} onestep fused",
            f"dcd_b{B_main}",
            corpus=eval_zh,
            limit=cfg.eval_zh_limit,
            group="zh",
            decoder="onestep",
            block_size=B_main,
        )
    if cfg.ablation:
        # The normalized side of the ablation is the main chain's evals (marked below).
        Ba = cfg.ablation_block
        evaluation("original text: ar", "ar_orig", group="ablation_orig", decoder="ar")
        evaluation(
            f"original text: rad_b{Ba} block K={Ba}",
            f"rad_b{Ba}_orig",
            group="ablation_orig",
            decoder="block",
            block_size=Ba,
            steps=Ba,
        )
        evaluation(
            f"original text: dcd_b{Ba} onestep fused",
            f"dcd_b{Ba}_orig",
            group="ablation_orig",
            decoder="onestep",
            block_size=Ba,
        )
        for s in steps:
            if s.info.get("label") in ("ar", f"rad_b{Ba} block K={Ba}", f"dcd_b{Ba} onestep fused"):
                s.info["ablation_norm"] = True

    # EOS vs content confidence of the RAD teachers and the DCD students.
    conf_folder = out / "eos_confidence"
    steps.append(
        Step(
            "analysis/eos_confidence",
            conf_folder,
            f"(in-process) echocxr.pipeline.eos_confidence_step on {eval_en} limit {cfg.eval_limit}",
            lambda resume: eos_confidence_step(cfg, trained, eval_en, conf_folder, opt),
            tuple(f"train/{k}" for k in trained if k.startswith(("rad_b", "dcd_b")) and "_orig" not in k),
        )
    )

    # Decode speed: the 7B shape with random weights on a GPU, the trained tiny/small model on CPU.
    bench_folder = out / "bench"
    argv = ["bench", "decode", "--append", str(bench_folder / "decode.jsonl"), "--device", opt.device]
    if opt.device.startswith("cuda"):
        argv += ["--shape", "qwen2.5-vl-7b", "--random-weights"]
    else:
        argv += ["--ckpt", str(checkpoint_dir(trained[f"dcd_b{B_main}"]))]
    argv += ["--batch-size", ",".join(map(str, cfg.bench_batch_sizes))]
    argv += ["--max-new-tokens", str(cfg.bench_new_tokens), "--block-size", str(B_main)]
    bench_cmds = []
    for dec in (["--decoder", "ar"], ["--decoder", "onestep", "--no-fuse"], ["--decoder", "onestep"]):
        bench_cmds.append(argv + dec)

    def bench(resume: bool) -> None:
        bench_folder.mkdir(parents=True, exist_ok=True)
        (bench_folder / "decode.jsonl").unlink(missing_ok=True)  # a partial run: measure again
        for a in bench_cmds:
            _cli(a)

    steps.append(
        Step(
            "bench/decode",
            bench_folder,
            " && ".join(_quote(a) for a in bench_cmds),
            bench,
            (f"train/dcd_b{B_main}",),
            {"commands": [_quote(a) for a in bench_cmds]},
        )
    )

    if opt.images is not None:
        real_folder = out / "real_images"
        steps.append(
            Step(
                "analysis/real_images",
                real_folder,
                f"(in-process) echocxr.pipeline.real_image_reports on {opt.images}",
                lambda resume: real_image_reports(
                    {
                        "ar": checkpoint_dir(trained["ar"]),
                        f"dcd_b{B_main} onestep fused": checkpoint_dir(trained[f"dcd_b{B_main}"]),
                    },
                    opt.images,
                    out / "data" / "corpus.jsonl",
                    real_folder,
                    opt.device,
                ),
                ("train/ar", f"train/dcd_b{B_main}", "data/norm"),
            )
        )
    return steps


# ----------------------------------------------------------------------------------------------
# In-process analysis steps


def best_k(k_folders: dict[int, Path]) -> int:
    """The step count whose finished eval scored best on grounding (`GROUNDING_HEADLINE`, then
    the >= 5 variant; ties go to fewer steps, the cheaper decoder). Raises UserError when an
    eval is missing."""
    scores = []
    for K, folder in sorted(k_folders.items()):
        path = folder / "aggregate.json"
        if not path.is_file():
            raise UserError(f"{path}: the K={K} eval has not finished; rerun the pipeline")
        m = next(iter(json.loads(path.read_text())["metrics"].values()), {})
        scores.append((*(m.get(k, {}).get("value", float("-inf")) for k in GROUNDING_RANK), -K))
    return -max(scores)[-1]


def _set_aside_other_settings(folder: Path, fingerprint: dict) -> None:
    """A resumed control whose best K changed: keep its old samples aside, start over."""
    settings = folder / "settings.json"
    if not settings.is_file():
        return
    try:
        same = json.loads(settings.read_text()) == fingerprint
    except json.JSONDecodeError:
        same = False
    if not same:
        folder.rename(folder.with_name(f"{folder.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}"))


def eos_confidence_step(cfg: PipelineConfig, trained: dict, eval_file: Path, folder: Path, opt: RunOptions):
    """EOS vs content confidence (echocxr.eval.evaluate.eos_confidence) per block size, for each
    RAD teacher and DCD student, on the phantom eval studies."""
    from echocxr.batch import Example, collate
    from echocxr.eval.evaluate import (
        EvalConfig,
        eos_confidence,
        load_records,
        record_images,
        summarize_confidence,
    )
    from echocxr.model.vlm import EchoVLM

    records = load_records(EvalConfig(ckpt="", corpus=str(eval_file), out="", limit=cfg.eval_limit))
    result: dict[str, dict] = {}
    for key, path in trained.items():
        if not key.startswith(("rad_b", "dcd_b")) or key.endswith("_orig"):
            continue
        B = int(key.split("_b")[1])
        model, tok, proc, meta = EchoVLM.from_pretrained(checkpoint_dir(path), device=opt.device)
        model.eval()
        views = tuple(meta.get("views") or ("frontal",))
        values: dict[str, list[float]] = {"eos": [], "content": []}
        for i in range(0, len(records), cfg.eval_batch_size):
            chunk = records[i : i + cfg.eval_batch_size]
            examples = []
            for r in chunk:
                imgs, _ = record_images(
                    r,
                    size=model.config.image_size,
                    seed=opt.seed,
                    source="phantom",
                    views=views,
                    root=eval_file.parent,
                )
                examples.append(Example(imgs, r.language, r.report, r.record_id))
            batch = collate(
                examples,
                tok,
                proc,
                model.config.image_tokens,
                max_response=model.config.max_response_tokens,
                multiple_of=B,
            ).to(opt.device)
            v = eos_confidence(model, batch, B)
            values["eos"] += v["eos"]
            values["content"] += v["content"]
        result[key] = {"block_size": B, **summarize_confidence(values)}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "eos_confidence.json").write_text(json.dumps(result, indent=2))


def real_image_studies(images: Path) -> dict[str, list[Path]]:
    """IU PNGs grouped by study: CXR<n>_IM-xxxx-1001.png (frontal) before -2001 (lateral)."""
    if not images.is_dir():
        raise UserError(f"{images}: no such folder of real radiographs")
    studies: dict[str, list[Path]] = {}
    for p in sorted(images.glob("*.png")):
        studies.setdefault(p.name.split("_", 1)[0], []).append(p)
    if not studies:
        raise UserError(f"{images}: no PNG radiographs")
    return {k: sorted(v, key=lambda p: p.stem.rsplit("-", 1)[-1]) for k, v in studies.items()}


def real_image_reports(ckpts: dict[str, Path], images: Path, corpus: Path, folder: Path, device: str) -> None:
    """Reports for the real IU radiographs by each model (greedy), beside the study's own report
    where the corpus has it. Phantom-trained models: no clinical meaning."""
    from echocxr.batch import Example, collate
    from echocxr.data.images import load_image, prepare_image
    from echocxr.data.records import read_jsonl
    from echocxr.decode.engine import Engine

    studies = real_image_studies(images)
    refs = {}
    if corpus.is_file():
        for r in read_jsonl(corpus):
            sid = r.study_id.split(":", 1)[-1]
            if sid in studies and r.language == "en":
                refs[sid] = {"report": r.report, "split": r.split}
    rows = []
    for label, ckpt in ckpts.items():
        dec = "ar" if label == "ar" else "onestep"
        engine = Engine.from_checkpoint(ckpt, device=device, decoder=dec)  # greedy; the checkpoint's B
        model, tok, proc = engine.model, engine.tokenizer, engine.processor
        n_views = len(engine.meta.get("views") or ("frontal",))
        for sid, paths in studies.items():
            ims = [prepare_image(load_image(p), model.config.image_size) for p in paths[:n_views]]
            batch = collate([Example(ims, "en")], tok, proc, model.config.image_tokens).to(device)
            text = engine.text(engine.generate(batch).tokens[0]).strip()
            rows.append(
                {
                    "study": sid,
                    "images": [p.name for p in paths[:n_views]],
                    "model": label,
                    "report": text,
                    "reference": refs.get(sid, {}).get("report"),
                    "reference_split": refs.get(sid, {}).get("split"),
                }
            )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "reports.json").write_text(json.dumps(rows, indent=2, ensure_ascii=False))


# ----------------------------------------------------------------------------------------------
# RESULTS.md


def machine() -> str:
    from echocxr.eval.evaluate import machine_name

    return machine_name("cpu")


def _fmt(v, digits=3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and v != v) else f"{v:.{digits}f}"


def collect(steps: list[Step]) -> dict:
    """Everything the results page shows, read back from the step folders."""
    evals, timing = [], {}
    for s in steps:
        m = marker(s.folder)
        if m:
            timing[s.name] = m
        agg_path = s.folder / "aggregate.json"
        if s.name.startswith("eval/") and agg_path.is_file():
            evals.append({**s.info, "command": s.command, "aggregate": json.loads(agg_path.read_text())})
    return {"evals": evals, "timing": timing}


def write_results(
    cfg: PipelineConfig, opt: RunOptions, steps: list[Step], path: Path, wall: float | None
) -> Path:
    from echocxr.eval.plots import eos_confidence_plot, pareto_plot

    data = collect(steps)
    fig_dir = path.parent / "figures"
    q = cfg.quality_metric
    lines = [
        f"# Results: `{cfg.name}` pipeline",
        "",
        f"Generated by `echocxr run --preset {cfg.name}` (or `echocxr demo`) on **{machine()}**, "
        f"device `{opt.device}`, finished {time.strftime('%Y-%m-%d %H:%M')} (UTC"
        f"{time.strftime('%z')}); Python {platform.python_version()}.",
        "",
        "**What these numbers are.** Models of the "
        f"`{cfg.model}` preset trained from scratch (Stage 0 {cfg.vision_steps} steps at batch "
        f"{cfg.vision_batch_size}; AR {cfg.ar_steps}, RAD {cfg.rad_steps} and DCD {cfg.dcd_steps} steps at "
        f"batch {cfg.batch_size}, DCD over {cfg.dcd_rounds} round(s) of {cfg.distill_studies} teacher-decoded "
        f"studies, {_TEACHER[cfg.dcd_teacher]}) on IU X-ray reports with "
        "**phantom radiographs** rendered from each study's MeSH findings (no real images exist "
        "here). They demonstrate that the chain runs and how the decoders trade speed for quality "
        "at this scale; they are not ECHO's results and carry no clinical meaning. Intervals are "
        "wide at this eval size: differences inside them are not findings.",
        "",
    ]
    if wall is not None:
        lines += [f"Wall time of this run (steps run now): {wall / 60:.1f} min.", ""]

    def table(rows, title):
        out = [f"## {title}", ""]
        if not rows:
            return out + ["(no evaluation finished)", ""]
        keys = []
        for e in rows:
            for lang_table in e["aggregate"]["metrics"].values():
                for k, v in lang_table.items():
                    if "value" in v and k not in keys and "/" not in k and not k.endswith(("_chexpert14",)):
                        keys.append(k)
        keys = [k for k in keys if k.split("_zh")[0] in _SHOWN] or keys[:6]
        out += [
            "| decoder | n | distinct reports | tokens/s | forwards/token | tokens/report | "
            + " | ".join(keys)
            + " |",
            "| --- " * (6 + len(keys)) + "|",
        ]
        for e in rows:
            a = e["aggregate"]
            sp = a["speed"]
            metrics = next(iter(a["metrics"].values()), {})
            cells = []
            for k in keys:
                v = metrics.get(k, {})
                ci = v.get("ci95")
                cells.append(
                    _fmt(v.get("value")) + (f" [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "")
                    if "value" in v
                    else "n/a"
                )
            out.append(
                f"| {e['label']} | {sp.get('samples')} | {_distinct(a)} | {_fmt(sp.get('tokens_per_s'), 1)} | "
                f"{_fmt(sp.get('forwards_per_token'))} | {_fmt(sp.get('mean_tokens'), 1)} | "
                + " | ".join(cells)
                + " |"
            )
        dates = sorted({e["aggregate"]["date"] for e in rows})
        machines = sorted({e["aggregate"]["machine"] for e in rows})
        out += [
            "",
            f"Values with 95% bootstrap intervals ({', '.join(machines)}; {', '.join(dates)}). Speed is "
            "measured inside each eval (prefill + decoding, batch of "
            f"{cfg.eval_batch_size}; forwards per token = a batch's forward passes over its longest row).",
            "",
        ]
        return out

    groups: dict[str, list] = {}
    for e in data["evals"]:
        groups.setdefault(e["group"], []).append(e)
    lines += grounding_section(groups.get("main", []), groups.get("control", []))
    lines += ratio_section(groups.get("main", []))
    lines += table(groups.get("main", []), "Every decoder on the held-out phantom studies (English)")

    points = [
        {
            "label": e["label"],
            "tokens_per_s": e["aggregate"]["speed"].get("tokens_per_s"),
            "forwards_per_token": e["aggregate"]["speed"].get("forwards_per_token"),
            q: next(iter(e["aggregate"]["metrics"].values()), {}).get(q, {}).get("value"),
        }
        for e in groups.get("main", [])
    ]
    if points:
        pareto_plot(points, fig_dir / "pareto_tokens_per_s.png", x="tokens_per_s", y=q)
        pareto_plot(points, fig_dir / "pareto_forwards.png", x="forwards_per_token", y=q)
        lines += [
            f"![{q} vs tokens/s](figures/pareto_tokens_per_s.png) ![{q} vs forwards per token](figures/pareto_forwards.png)",
            "",
        ]
    if groups.get("zh"):
        lines += table(groups["zh"], "Chinese held-out studies")
    if groups.get("ablation_orig"):
        normalized = [
            {**e, "label": "normalized: " + e["label"]} for e in data["evals"] if e.get("ablation_norm")
        ]
        lines += table(
            normalized + groups["ablation_orig"],
            "Ablation: normalized vs original report text as the training target",
        )
        lines += [
            "Both rows are scored against the same normalized references of the held-out set; "
            "`phantom_f1` compares with the findings the images were rendered from and does not "
            "depend on the reference style.",
            "",
            *ablation_grounding(normalized, groups["ablation_orig"]),
        ]

    conf_path = next(
        (s.folder / "eos_confidence.json" for s in steps if s.name == "analysis/eos_confidence"), None
    )
    if conf_path and conf_path.is_file():
        conf = json.loads(conf_path.read_text())
        lines += [
            "## EOS vs content confidence",
            "",
            "Probability the model gives the reference token when the whole block is masked (the "
            "one-step situation), in the RAD layout [prompt | masked blocks | clean reference], on "
            f"{'all' if cfg.eval_limit is None else f'the first {cfg.eval_limit}'} held-out EN studies. "
            "EOS = the report's first EOS and the EOS "
            "padding after it in its block; content = every earlier token.",
            "",
            "| model | B | content | EOS | n content | n EOS |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for key, v in conf.items():
            lines.append(
                f"| {key} | {v['block_size']} | {_fmt(v['content'])} ± {_fmt(v['content_se'])} | "
                f"{_fmt(v['eos'])} ± {_fmt(v['eos_se'])} | {v['content_n']} | {v['eos_n']} |"
            )
        for kind in ("rad", "dcd"):
            by_block = {v["block_size"]: v for k, v in conf.items() if k.startswith(kind)}
            if by_block:
                eos_confidence_plot(
                    by_block, fig_dir / f"eos_confidence_{kind}.png", title=f"{kind.upper()} models"
                )
                lines.append(f"\n![EOS confidence {kind}](figures/eos_confidence_{kind}.png)")
        lines.append("")

    bench_file = next((s.folder / "decode.jsonl" for s in steps if s.name == "bench/decode"), None)
    if bench_file and bench_file.is_file():
        bench_step = next(s for s in steps if s.name == "bench/decode")
        rows = [json.loads(x) for x in bench_file.read_text().splitlines() if x.strip()]
        gpu = opt.device.startswith("cuda")
        lines += [
            "## Decode speed ("
            + ("Qwen2.5-VL-7B shape, random weights" if gpu else "CPU smoke test, trained tiny model")
            + ")",
            "",
        ]
        if not gpu:
            lines += [
                "**CPU smoke numbers**: a tiny model on a shared CPU. They show the benchmark runs; they "
                "say nothing about speed at 7B on a GPU.",
                "",
            ]
        lines += ["```", *[json.dumps(r) for r in rows], "```", "", "Commands:", ""]
        lines += [f"- `{c}`" for c in bench_step.info["commands"]] + [""]

    real_file = next((s.folder / "reports.json" for s in steps if s.name == "analysis/real_images"), None)
    if real_file and real_file.is_file():
        lines += [
            "## Reports for the four real IU radiographs",
            "",
            "**Written by models trained on phantom images only: no clinical meaning.** They show the "
            "real-image path runs end to end (PNG -> processor -> model -> report).",
            "",
        ]
        for r in json.loads(real_file.read_text()):
            lines += [
                f"- **{r['study']}** ({', '.join(r['images'])}), {r['model']}: {r['report']!r}",
            ]
            if r.get("reference"):
                lines.append(f"  - the study's own report ({r['reference_split']} split): {r['reference']!r}")
        lines.append("")

    lines += [
        "## How each number was made",
        "",
        "| step | seconds | finished | command |",
        "| --- | --- | --- | --- |",
    ]
    for s in steps:
        m = data["timing"].get(s.name)
        if m:
            lines.append(f"| {s.name} | {m['seconds']:.0f} | {m['date']} | `{s.command}` |")
    lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


def _distinct(aggregate: dict) -> str:
    r = next(iter(aggregate.get("reports", {}).values()), None)
    return "n/a" if r is None else str(r["distinct"])


def _control_key(aggregate: dict) -> str | None:
    """What a control shares with its real-phantom eval: checkpoint (and its weights), decoder,
    corpus, seed. None for an aggregate without settings (it matches nothing)."""
    settings = aggregate.get("settings")
    if not settings:
        return None
    return json.dumps(
        {k: v for k, v in settings.items() if k not in ("image_source", "limit")}, sort_keys=True
    )


def _gap(real, control) -> str:
    return f"{real - control:+.3f}" if real is not None and control is not None else "n/a"


def _value(aggregate: dict, key: str):
    return next(iter(aggregate["metrics"].values()), {}).get(key, {}).get("value")


def ablation_grounding(normalized: list[dict], original: list[dict]) -> list[str]:
    """One line per decoder of the text ablation: its abnormal-finding macro-F1 and distinct reports
    trained on normalized vs original text (rows paired by the label after the side's prefix)."""
    H = GROUNDING_HEADLINE
    orig = {e["label"].removeprefix("original text: "): e["aggregate"] for e in original}
    out = []
    for e in normalized:
        name = e["label"].removeprefix("normalized: ")
        if name in orig:
            a, b = e["aggregate"], orig[name]
            out.append(
                f"- {name}: `{H}` {_fmt(_value(a, H))} trained on normalized text vs {_fmt(_value(b, H))} "
                f"on original text; distinct reports {_distinct(a)} vs {_distinct(b)}."
            )
    return out + [""] if out else []


def grounding_section(main: list[dict], controls: list[dict]) -> list[str]:
    """The results page's first table: abnormal-finding macro-F1 per decoder on its own phantoms
    beside the same checkpoint and decoder on blank and shuffled images, and the distinct reports;
    then per-finding F1 for the evals marked `per_finding` (AR and the final one-step model)."""
    H = GROUNDING_HEADLINE
    by_key: dict[str, dict[str, dict]] = {}
    for c in controls:
        a = c["aggregate"]
        if _control_key(a) is not None:
            by_key.setdefault(_control_key(a), {})[a.get("image_source", "")] = a
    out = [
        "## Grounding: does the model read its image?",
        "",
        f"`{H}`: F1 of the project's labeler reading each generated report against the findings its "
        "phantom was drawn with, averaged over the abnormal findings (`no_finding` left out) that have "
        f"at least {GROUNDING_MIN_POSITIVES} positives among the evaluated studies; a labeler's *uncertain* counts as absent. "
        "**A gap to the image-blind controls is what shows the model reads its image**: *blank* feeds "
        "a constant mid-grey image, *shuffled* the phantoms of another study of the same set, while "
        "the truth stays the study's own. `phantom_f1_micro` (in the tables below) counts `no_finding` "
        "hits, so a constant normal report scores well on it; it is not a grounding number.",
        "",
        f"| decoder | n | distinct reports | {H} | blank | shuffled | gap to blank | gap to shuffled "
        f"| phantom_abn_macro_f1@5 | findings >= {GROUNDING_MIN_POSITIVES} / >= 5 |",
        "| --- " * 10 + "|",
    ]
    for e in main:
        a = e["aggregate"]
        real = _value(a, H)
        ctl = by_key.get(_control_key(a) or "", {})
        blank, shuffled = (_value(ctl[s], H) if s in ctl else None for s in ("blank", "shuffled"))
        ci = next(iter(a["metrics"].values()), {}).get(H, {}).get("ci95")

        n10, n5 = (_value(a, f"phantom_abn_findings@{m}") for m in (GROUNDING_MIN_POSITIVES, 5))
        out.append(
            f"| {e['label']} | {a['speed'].get('samples')} | {_distinct(a)} | {_fmt(real)}"
            + (f" [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "")
            + f" | {_fmt(blank)} | {_fmt(shuffled)} | {_gap(real, blank)} | {_gap(real, shuffled)} | "
            f"{_fmt(_value(a, 'phantom_abn_macro_f1@5'))} | "
            + (f"{n10:.0f} / {n5:.0f}" if n10 is not None and n5 is not None else "n/a")
            + " |"
        )
    out += [
        "",
        "Controls run for AR, each RAD teacher at its best K (by "
        f"`{H}`, then the >= 5 variant; ties to fewer steps) and each fused DCD model; "
        "other rows show n/a. Values with 95% bootstrap intervals over studies.",
        "",
    ]
    marked = [e for e in main if e.get("per_finding")]
    findings: list[str] = []
    for e in marked:
        for k in next(iter(e["aggregate"]["metrics"].values()), {}):
            if k.startswith("phantom_abn_f1/") and k.split("/", 1)[1] not in findings:
                findings.append(k.split("/", 1)[1])
    if marked and findings:
        out += [
            "Per-finding F1 against the phantom truth (positives = evaluated studies drawn with it):",
            "",
            "| finding | positives | " + " | ".join(e["label"] for e in marked) + " |",
            "| --- " * (2 + len(marked)) + "|",
        ]
        for f in findings:
            pos = next((_value(e["aggregate"], f"phantom_abn_positives/{f}") for e in marked), None)
            cells = [_fmt(_value(e["aggregate"], f"phantom_abn_f1/{f}")) for e in marked]
            out.append(f"| {f} | {_fmt(pos, 0)} | " + " | ".join(cells) + " |")
        out.append("")
    return out


_TEACHER = {
    "rad": "the RAD model's block decoder as DCD's teacher (the paper's)",
    "ar": "the Stage 1 AR model as DCD's teacher, left to right (not the paper's ECHO_Base teacher: "
    "docs/DCD.md, 'Ablations (issue #20)')",
}
RATIO_METRICS: tuple[str, ...] = (GROUNDING_HEADLINE, "rougeL_coco", "label_f1_micro")  # issue #20


def ratio_section(main: list[dict]) -> list[str]:
    """Every one-step model against AR and against the undistilled one-step model of its block
    size, on RATIO_METRICS (issue #20's targets), from the evals' `role` and `block` info."""
    ar = next((e["aggregate"] for e in main if e.get("role") == "ar"), None)
    undistilled = {e["block"]: e["aggregate"] for e in main if e.get("role") == "onestep_undistilled"}
    rows = [e for e in main if e.get("role") in ("onestep_dcd", "onestep_undistilled")]
    if ar is None or not rows:
        return []

    def ratio(a, b, key) -> str:
        x, y = _value(a, key), (_value(b, key) if b is not None else None)
        return "n/a" if x is None or not y else f"{x / y:.0%}"

    head = " | ".join(f"{k}: value / vs AR / vs undistilled" for k in RATIO_METRICS)
    out = [
        "## One-step models against AR and against no distillation",
        "",
        "Each one-step model's value, its ratio to the AR model's and its ratio to the undistilled "
        "one-step model of the same block size (the RAD teacher decoded in one step per block), on "
        "all evaluated studies, normal ones included. Issue #20's targets: DCD at or above the "
        "undistilled model on the grounding number and ROUGE-L, and at >= 90% (demo) / 95% (base) "
        "of AR on all three.",
        "",
        f"| model | B | {head} |",
        "| --- | --- " + "| --- " * len(RATIO_METRICS) + "|",
    ]
    for e in rows:
        a, base = e["aggregate"], undistilled.get(e["block"])
        cells = [
            f"{_fmt(_value(a, k))} / {ratio(a, ar, k)} / "
            + ("1" if e.get("role") == "onestep_undistilled" else ratio(a, base, k))
            for k in RATIO_METRICS
        ]
        out.append(f"| {e['label']} | {e['block']} | " + " | ".join(cells) + " |")
    return out + [""]


_SHOWN = (
    "bleu4_coco",
    "meteor_coco",
    "rougeL_coco",
    "cider_coco",
    "semscore_minilm",
    "label_f1_micro",
    "phantom_f1_micro",
)


# ----------------------------------------------------------------------------------------------
# Commands


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--out", default=None, help="run folder (default runs/<preset>)")
    parser.add_argument("--iu", default=DEFAULT_IU, help="IU report archive (NLMCXR_reports.tgz)")
    parser.add_argument(
        "--images", default=DEFAULT_IMAGES, help="real IU PNGs to write reports for ('' to skip)"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--results", default="docs/RESULTS.md", help="where to write the results page")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-ablation", action="store_true", help="skip the original-report ablation")
    parser.add_argument(
        "--dry-run", action="store_true", help="print each step's state and command, run nothing"
    )


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="run folder")
    parser.add_argument("--iu", default=DEFAULT_IU, help="IU report archive (NLMCXR_reports.tgz)")
    parser.add_argument(
        "--images", default=DEFAULT_IMAGES, help="real IU PNGs to write reports for ('' to skip)"
    )
    parser.add_argument("--results", default="docs/RESULTS.md", help="where to write the results page")
    parser.add_argument(
        "--dry-run", action="store_true", help="print each step's state and command, run nothing"
    )


def _options(args, preset: str) -> tuple[PipelineConfig, RunOptions]:
    iu = Path(args.iu)
    if not iu.exists():
        raise UserError(f"{iu}: IU report archive not found (pass --iu PATH to NLMCXR_reports.tgz)")
    images = Path(args.images) if args.images else None
    if images is not None and not images.is_dir():
        raise UserError(f"{images}: folder of real radiographs not found (pass --images '' to skip them)")
    cfg = get_pipeline_preset(preset, **({"ablation": False} if getattr(args, "no_ablation", False) else {}))
    opt = RunOptions(
        out=Path(args.out or f"runs/{preset}"),
        iu=iu.resolve(),
        images=images.resolve() if images else None,
        device=getattr(args, "device", "cpu"),
        results=Path(args.results) if args.results else None,
        seed=getattr(args, "seed", 0),
    )
    if opt.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda but no CUDA device is visible")
    return cfg, opt


def run_pipeline(cfg: PipelineConfig, opt: RunOptions, *, dry_run: bool = False) -> int:
    steps = plan(cfg, opt)
    if dry_run:
        for name, state in status(steps).items():
            cmd = next(s.command for s in steps if s.name == name)
            print(f"{state:8s} {name}: {cmd}")
        return 0
    # Entry point: nothing may reach a model hub; the metrics load their models from local folders.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t0 = time.perf_counter()
    execute(steps, log=lambda m: print(m, file=sys.stderr, flush=True))
    wall = time.perf_counter() - t0
    page = write_results(cfg, opt, steps, opt.out / "RESULTS.md", wall)
    if opt.results is not None:
        write_results(cfg, opt, steps, opt.results, wall)
    print_summary(steps)
    print(f"\nwrote {page}" + (f" and {opt.results}" if opt.results else "") + f" ({wall / 60:.1f} min)")
    return 0


def print_summary(steps: list[Step]) -> None:
    data = collect(steps)
    print(
        f"{'decoder':44s} {'n':>4s} {'tok/s':>8s} {'fwd/tok':>8s} {'ROUGE-L':>8s} {'phantomF1':>9s} "
        f"{'abnF1@10':>9s} {'distinct':>8s}"
    )
    for e in data["evals"]:
        a = e["aggregate"]
        m = next(iter(a["metrics"].values()), {})
        print(
            f"{e['label'][:44]:44s} {a['speed'].get('samples', 0):4d} {_fmt(a['speed'].get('tokens_per_s'), 1):>8s} "
            f"{_fmt(a['speed'].get('forwards_per_token')):>8s} {_fmt(m.get('rougeL_coco', {}).get('value')):>8s} "
            f"{_fmt(m.get('phantom_f1_micro', {}).get('value')):>9s} "
            f"{_fmt(m.get(GROUNDING_HEADLINE, {}).get('value')):>9s} {_distinct(a):>8s}"
        )


def run(args: argparse.Namespace) -> int:
    cfg, opt = _options(args, args.preset)
    return run_pipeline(cfg, opt, dry_run=args.dry_run)


def run_demo(args: argparse.Namespace) -> int:
    """`run --preset tiny` on CPU with the shared IU archive and the four real radiographs."""
    args.device, args.seed = "cpu", 0
    cfg, opt = _options(args, "tiny")
    print(
        "echocxr demo: small models trained on phantom radiographs on CPU (at most 15 minutes on 2 cores). "
        "Reports on the real radiographs have no clinical meaning.",
        file=sys.stderr,
    )
    return run_pipeline(cfg, opt, dry_run=args.dry_run)
