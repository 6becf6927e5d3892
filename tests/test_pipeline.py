"""The pipeline's presets, plan and step skipping (the full demo run is not a unit test)."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest

from echocxr import pipeline as pl
from echocxr.errors import UserError


def test_presets_are_typed_and_frozen():
    tiny, small = pl.get_pipeline_preset("tiny"), pl.get_pipeline_preset("small")
    assert tiny.model == "mini" and small.model == "small"  # the demo model sees 168 px
    assert tiny.ar_steps < small.ar_steps and tiny.block_sizes == (8,)  # base trains 4 and 8
    assert pl.get_pipeline_preset("base").block_sizes == (4, 8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        tiny.ar_steps = 1
    assert pl.get_pipeline_preset("tiny", ar_steps=7).ar_steps == 7
    with pytest.raises(UserError, match="unknown pipeline preset"):
        pl.get_pipeline_preset("huge")
    with pytest.raises(UserError, match="ablation block"):
        pl.get_pipeline_preset("base", ablation_block=16)  # tiny runs no ablation


def _steps(root: Path, calls: list, command_b: str = "b v1") -> list[pl.Step]:
    def act(name, folder):
        def action(resume: bool) -> None:
            calls.append((name, resume))
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "out.txt").write_text(name)

        return action

    a, b, c = root / "a", root / "b", root / "c"
    return [
        pl.Step("a", a, "a v1", act("a", a)),
        pl.Step("b", b, command_b, act("b", b), ("a",)),
        pl.Step("c", c, "c v1", act("c", c), ("b",)),
    ]


def test_steps_run_once_then_skip(tmp_path):
    calls: list = []
    ran = pl.execute(_steps(tmp_path, calls), log=lambda m: None)
    assert list(ran) == ["a", "b", "c"] and calls == [("a", False), ("b", False), ("c", False)]
    calls.clear()
    assert pl.execute(_steps(tmp_path, calls), log=lambda m: None) == {} and calls == []
    assert pl.status(_steps(tmp_path, calls)) == {"a": "done", "b": "done", "c": "done"}


def test_killed_step_resumes_and_downstream_reruns(tmp_path):
    calls: list = []
    pl.execute(_steps(tmp_path, calls), log=lambda m: None)
    # b was killed mid-way in a second run: its folder has outputs but no marker
    (tmp_path / "b" / pl.DONE).unlink()
    assert pl.status(_steps(tmp_path, calls))["b"] == "partial"
    calls.clear()
    time.sleep(0.01)  # markers are compared by finish time
    pl.execute(_steps(tmp_path, calls), log=lambda m: None)
    # b resumes; c finished before the new b, so its outputs are stale: moved aside and redone
    assert calls == [("b", True), ("c", False)]
    stale = [p.name for p in tmp_path.iterdir() if p.name.startswith("c.stale-")]
    assert len(stale) == 1 and (tmp_path / stale[0] / "out.txt").read_text() == "c"


def test_changed_command_is_stale(tmp_path):
    calls: list = []
    pl.execute(_steps(tmp_path, calls), log=lambda m: None)
    st = pl.status(_steps(tmp_path, calls, command_b="b v2"))
    assert st == {"a": "done", "b": "stale", "c": "stale"}
    calls.clear()
    pl.execute(_steps(tmp_path, calls, command_b="b v2"), log=lambda m: None)
    assert calls == [("b", False), ("c", False)]
    assert json.loads((tmp_path / "b" / pl.DONE).read_text())["command"] == "b v2"


def test_plan_covers_every_decoder_and_the_ablation(tmp_path):
    opt = pl.RunOptions(out=tmp_path / "run", iu=tmp_path / "iu.tgz", images=tmp_path / "img")
    steps = pl.plan(pl.get_pipeline_preset("tiny", ablation=True, block_sizes=(4, 8)), opt)
    names = [s.name for s in steps]
    assert len(names) == len(set(names))
    for n in ("data/norm", "data/orig", "train/ar", "train/rad_b4", "train/dcd_b8", "train/dcd_b4_orig"):
        assert n in names
    labels = [s.info.get("label") for s in steps if s.name.startswith("eval/")]
    for want in (
        "ar",
        "rad_b8 block K=1",
        "rad_b8 block K=8",
        "rad_b4 block K=4",
        "rad_b8 onestep (undistilled)",
        "dcd_b8 onestep vanilla",
        "dcd_b8 onestep fused",
        "original text: dcd_b4 onestep fused",
    ):
        assert want in labels
    assert "rad_b4 block K=8" not in labels  # K <= B
    # every dependency is an earlier step
    seen: set[str] = set()
    for s in steps:
        assert set(s.deps) <= seen, s.name
        seen.add(s.name)
    rad = next(s for s in steps if s.name == "train/rad_b4")
    assert (
        "--init " + str(tmp_path / "run" / "ar" / "final") in rad.command and "--block-size 4" in rad.command
    )
    onestep = next(s for s in steps if s.info.get("label") == "dcd_b8 onestep vanilla")
    assert "--decoder onestep" in onestep.command and "--no-fuse" in onestep.command
    no_abl = pl.plan(pl.get_pipeline_preset("tiny", ablation=False, block_sizes=(4, 8)), opt)
    assert not any("orig" in s.name for s in no_abl)
    # Image-blind controls: AR, each RAD teacher at its best K, each fused DCD model.
    by_label = {s.info.get("label"): s for s in steps if s.name.startswith("eval/")}
    for label in (
        "ar",
        "dcd_b4 onestep fused",
        "dcd_b8 onestep fused",
        "rad_b4 block best K",
        "rad_b8 block best K",
    ):
        for src in ("blank", "shuffled"):
            control = by_label[f"{label} [{src}]"]
            assert control.info["group"] == "control" and f"--image-source {src}" in control.command
    best = by_label["rad_b8 block best K [blank]"]
    assert {f"eval/rad_b8_block_k_{k}" for k in (1, 2, 4, 8)} <= set(best.deps)
    assert not any("[" in (s.info.get("label") or "") for s in steps if "orig" in s.name)
    # Every real-phantom eval scores grounding, whatever the preset lists.
    for s in steps:
        if s.name.startswith("eval/"):
            assert "phantom_grounding" in s.command, s.name
    assert {s.info.get("label") for s in steps if s.info.get("per_finding")} == {"ar", "dcd_b8 onestep fused"}


def test_best_k_reads_the_finished_evals(tmp_path):
    def write(K, at10, at5):
        folder = tmp_path / f"k{K}"
        folder.mkdir()
        metrics = {"phantom_abn_macro_f1@10": {"value": at10}, "phantom_abn_macro_f1@5": {"value": at5}}
        (folder / "aggregate.json").write_text(json.dumps({"metrics": {"en": metrics}}))
        return folder

    folders = {1: write(1, 0.2, 0.3), 2: write(2, 0.4, 0.1), 4: write(4, 0.4, 0.2), 8: write(8, 0.1, 0.9)}
    assert pl.best_k(folders) == 4  # tied at @10, the >= 5 variant decides
    assert pl.best_k({2: folders[2], 4: write(16, 0.4, 0.2), 8: folders[8]}) == 4
    same = {K: write(K, 0.0, 0.0) for K in (3, 5)}
    assert pl.best_k(same) == 3  # a full tie goes to fewer steps
    with pytest.raises(UserError, match="K=7"):
        pl.best_k({**folders, 7: tmp_path / "missing"})
    # A resumed control whose best K changed starts over; its old samples are kept aside.
    control = tmp_path / "control"
    control.mkdir()
    (control / "settings.json").write_text(json.dumps({"steps": 2}))
    pl._set_aside_other_settings(control, {"steps": 2})
    assert control.is_dir()
    pl._set_aside_other_settings(control, {"steps": 4})
    assert not control.exists() and len(list(tmp_path.glob("control.stale-*"))) == 1


def test_real_image_studies_group_views(iu_images):
    studies = pl.real_image_studies(iu_images)
    assert sorted(studies) == ["CXR1900", "CXR7"]
    assert [p.name for p in studies["CXR7"]] == ["CXR7_IM-2263-1001.png", "CXR7_IM-2263-2001.png"]


def test_results_page_from_finished_steps(tmp_path):
    folder = tmp_path / "eval" / "ar"
    folder.mkdir(parents=True)
    agg = {
        "speed": {"samples": 4, "tokens_per_s": 120.0, "forwards_per_token": 1.0, "mean_tokens": 30.0},
        "metrics": {
            "en": {"rougeL_coco": {"value": 0.25, "ci95": [0.2, 0.3]}, "bleu4_coco": {"skipped": "x"}}
        },
        "machine": "test cpu",
        "date": "2026-01-01",
    }
    (folder / "aggregate.json").write_text(json.dumps(agg))
    step = pl.Step(
        "eval/ar", folder, "echocxr eval --decoder ar", lambda r: None, (), {"label": "ar", "group": "main"}
    )
    pl._mark_done(step, 3.0)
    opt = pl.RunOptions(out=tmp_path, iu=tmp_path, images=None)
    page = pl.write_results(pl.get_pipeline_preset("tiny"), opt, [step], tmp_path / "RESULTS.md", 60.0)
    text = page.read_text()
    assert "| ar | 4 | n/a | 120.0 | 1.000 | 30.0 | 0.250 [0.200, 0.300] |" in text
    assert "`echocxr eval --decoder ar`" in text and "phantom" in text
    assert (tmp_path / "figures" / "pareto_tokens_per_s.png").is_file()


def _agg(source: str, at10: float, distinct: int, ckpt: str = "runs/ar") -> dict:
    metrics = {
        "phantom_abn_macro_f1@10": {"value": at10, "ci95": [at10 - 0.1, at10 + 0.1]},
        "phantom_abn_macro_f1@5": {"value": at10 / 2, "ci95": None},
        "phantom_abn_findings@10": {"value": 2.0, "ci95": None},
        "phantom_abn_findings@5": {"value": 3.0, "ci95": None},
        "phantom_abn_f1/cardiomegaly": {"value": 0.75, "ci95": [0.5, 1.0]},
        "phantom_abn_positives/cardiomegaly": {"value": 12.0, "ci95": None},
        "phantom_f1_micro": {"value": 0.5, "ci95": [0.4, 0.6]},
    }
    return {
        "speed": {"samples": 64, "tokens_per_s": 100.0, "forwards_per_token": 1.0, "mean_tokens": 30.0},
        "reports": {"en": {"samples": 64, "distinct": distinct, "top_share": 0.5}},
        "image_source": source,
        "settings": {"ckpt": ckpt, "decoder": "ar", "image_source": source, "seed": 0},
        "metrics": {"en": metrics},
        "machine": "test cpu",
        "date": "2026-01-01",
    }


def test_results_page_leads_with_grounding_and_its_controls(tmp_path):
    steps = []
    for name, agg, info in (
        ("ar", _agg("phantom", 0.6, 20), {"label": "ar", "group": "main", "per_finding": True}),
        ("ar_blank", _agg("blank", 0.1, 1), {"label": "ar [blank]", "group": "control"}),
        ("ar_shuffled", _agg("shuffled", 0.25, 18), {"label": "ar [shuffled]", "group": "control"}),
        # another checkpoint's control must not be read as AR's
        ("x_blank", _agg("blank", 0.59, 1, ckpt="runs/x"), {"label": "x [blank]", "group": "control"}),
        ("dcd", _agg("phantom", 0.3, 5, ckpt="runs/dcd"), {"label": "dcd fused", "group": "main"}),
    ):
        folder = tmp_path / "eval" / name
        folder.mkdir(parents=True)
        (folder / "aggregate.json").write_text(json.dumps(agg))
        steps.append(pl.Step(f"eval/{name}", folder, f"echocxr eval {name}", lambda r: None, (), info))
    opt = pl.RunOptions(out=tmp_path, iu=tmp_path, images=None)
    text = pl.write_results(
        pl.get_pipeline_preset("tiny"), opt, steps, tmp_path / "RESULTS.md", None
    ).read_text()
    assert text.index("## Grounding") < text.index("## Every decoder")
    assert "| ar | 64 | 20 | 0.600 [0.500, 0.700] | 0.100 | 0.250 | +0.500 | +0.350 | 0.300 | 2 / 3 |" in text
    assert "| dcd fused | 64 | 5 | 0.300 [0.200, 0.400] | n/a | n/a | n/a | n/a | 0.150 | 2 / 3 |" in text
    assert "gap to the image-blind controls is what shows the model reads its image" in text
    assert "`phantom_f1_micro` (in the tables below) counts `no_finding`" in text
    assert "| cardiomegaly | 12 | 0.750 |" in text  # per-finding F1 of the marked eval
    assert "| ar [blank] |" not in text.split("## Every decoder")[1]  # controls only beside their eval


def test_demo_needs_the_archive(tmp_path):
    import argparse

    p = argparse.ArgumentParser()
    pl.add_demo_arguments(p)
    args = p.parse_args(["--iu", str(tmp_path / "missing.tgz"), "--images", ""])
    with pytest.raises(UserError, match="missing.tgz"):
        pl.run_demo(args)


@pytest.mark.slow
def test_micro_pipeline_end_to_end(tmp_path, iu_archive, iu_images):
    """The real chain on 150 IU reports with a few steps per stage: every step runs through the
    CLI, the results page has a row per decoder, and a rerun skips everything."""
    import tarfile

    small = tmp_path / "iu150.tgz"
    with tarfile.open(iu_archive) as src, tarfile.open(small, "w:gz") as dst:
        members = [m for m in src.getmembers() if m.isfile() and m.name.endswith(".xml")][:150]
        for m in members:
            dst.addfile(m, src.extractfile(m))
    cfg = pl.get_pipeline_preset(
        "tiny",
        vision_steps=2,
        # a 3-step AR teacher writes nothing but repetition loops, which DCD refuses (UserError); the
        # RAD teacher path runs here, the AR teacher's in test_dcd.py and test_dcd_teacher_choice_...
        dcd_teacher="rad",
        ablation=True,
        block_sizes=(4, 8),
        ar_steps=3,
        rad_steps=3,
        dcd_steps=2,
        batch_size=4,
        warmup=1,
        distill_studies=4,
        eval_limit=4,
        eval_zh_limit=2,
        eval_batch_size=4,
        eval_size=10,
        metrics=("bleu_coco", "phantom_f1"),
        bench_batch_sizes=(1,),
        bench_new_tokens=8,
        log_every=1,
    )
    opt = pl.RunOptions(out=tmp_path / "run", iu=small, images=iu_images, results=tmp_path / "RESULTS.md")
    assert pl.run_pipeline(cfg, opt) == 0
    page = (tmp_path / "RESULTS.md").read_text()
    for label in ("| ar |", "rad_b8 block K=8", "dcd_b4 onestep fused", "zh dcd_b8", "original text: dcd_b4"):
        assert label in page
    assert "## Reports for the four real IU radiographs" in page
    # The ablation says what it shows: grounding of each decoder trained on either text.
    assert "- ar: `phantom_abn_macro_f1@10` " in page and " on original text; distinct reports " in page
    # The grounding table leads, with both controls found beside AR and the fused DCD models.
    grounding = page[page.index("## Grounding") : page.index("## Every decoder")]
    rows = {line.split("|")[1].strip(): line for line in grounding.splitlines() if line.startswith("| ")}

    def has_controls(label: str) -> bool:
        cells = [c.strip() for c in rows[label].strip("|").split("|")]
        return "n/a" not in cells[4:8]  # blank, shuffled and both gaps

    assert all(has_controls(x) for x in ("ar", "dcd_b4 onestep fused", "dcd_b8 onestep fused"))
    assert sum(has_controls(f"rad_b8 block K={k}") for k in (1, 2, 4, 8)) == 1  # the best K only
    best = json.loads(
        (tmp_path / "run" / "eval" / "rad_b8_block_best_k_shuffled" / "aggregate.json").read_text()
    )
    assert best["image_source"] == "shuffled" and best["decode"]["steps"] in (1, 2, 4, 8)
    meta = json.loads((tmp_path / "run" / "dcd_b8" / "final" / "echocxr.json").read_text())
    assert meta["stage"] == "dcd" and meta["block_size"] == 8
    steps = pl.plan(cfg, opt)
    assert set(pl.status(steps).values()) == {"done"}


def test_cpu_presets_warm_start_the_vision_tower(tmp_path):
    """`tiny` and `base` run Stage 0 once and start AR from its final checkpoint on models that see
    168 px (36 image tokens); `base` runs the ablation, whose AR copies the same tower into a fresh
    preset model (its own BPE), and evaluates >= 200 EN studies and the ZH set."""
    from echocxr.model.config import get_preset

    opt = pl.RunOptions(out=tmp_path / "run", iu=tmp_path / "iu.tgz", images=None)
    for name in ("tiny", "base"):
        cfg = pl.get_pipeline_preset(name)
        model = get_preset(cfg.model)
        assert model.image_size >= 160 and model.image_tokens == 36
        steps = {s.name: s for s in pl.plan(cfg, opt)}
        vis, ar = steps["train/vision"], steps["train/ar"]
        assert f"--stage vision --init {cfg.model} " in vis.command
        assert f"--batch-size {cfg.vision_batch_size} " in vis.command
        assert "--init " + str(tmp_path / "run" / "vision" / "final") in ar.command
        assert ar.deps == ("train/vision",)
        assert "train/vision_orig" not in steps
        dcd = steps["train/dcd_b8"].command
        assert (
            f"--distill-studies {cfg.distill_studies} --rounds {cfg.dcd_rounds}" in dcd and cfg.dcd_rounds > 1
        )
        if cfg.ablation:
            orig = steps["train/ar_orig"]
            assert f"--init {cfg.model} " in orig.command
            assert "--vision-from " + str(tmp_path / "run" / "vision" / "final") in orig.command
            assert orig.deps == ("data/orig", "train/vision")
    base = pl.get_pipeline_preset("base")
    assert base.ablation and base.block_sizes == (4, 8) and base.eval_limit >= 200 and base.eval_zh_limit
    assert base.eval_size >= base.eval_limit
    off = {s.name for s in pl.plan(pl.get_pipeline_preset("tiny", vision_steps=0), opt)}
    assert "train/vision" not in off
    with pytest.raises(UserError):
        pl.get_pipeline_preset("tiny", vision_steps=-1)


def test_results_page_states_each_one_step_models_ratios(tmp_path):
    """Issue #20: every one-step model's ratio to AR and to the undistilled one-step model of its
    block size, on the grounding number, ROUGE-L and label F1 micro."""

    def agg(at10, rouge, label):
        a = _agg("phantom", at10, 10)
        a["metrics"]["en"] |= {"rougeL_coco": {"value": rouge}, "label_f1_micro": {"value": label}}
        return a

    steps = []
    for name, a, info in (
        ("ar", agg(0.4, 0.6, 0.5), {"label": "ar", "group": "main", "role": "ar"}),
        (
            "u8",
            agg(0.2, 0.3, 0.5),
            {"label": "undistilled", "group": "main", "role": "onestep_undistilled", "block": 8},
        ),
        (
            "d8",
            agg(0.3, 0.6, 0.25),
            {"label": "dcd fused", "group": "main", "role": "onestep_dcd", "block": 8},
        ),
    ):
        folder = tmp_path / "eval" / name
        folder.mkdir(parents=True)
        (folder / "aggregate.json").write_text(json.dumps(a))
        steps.append(pl.Step(f"eval/{name}", folder, f"echocxr eval {name}", lambda r: None, (), info))
    opt = pl.RunOptions(out=tmp_path, iu=tmp_path, images=None)
    text = pl.write_results(pl.get_pipeline_preset("tiny"), opt, steps, tmp_path / "R.md", None).read_text()
    assert "## One-step models against AR and against no distillation" in text
    assert "| dcd fused | 8 | 0.300 / 75% / 150% | 0.600 / 100% / 200% | 0.250 / 50% / 50% |" in text
    assert "| undistilled | 8 | 0.200 / 50% / 1 | 0.300 / 50% / 1 | 0.500 / 100% / 1 |" in text


def test_dcd_teacher_choice_reaches_the_dcd_command(tmp_path):
    opt = pl.RunOptions(out=tmp_path, iu=tmp_path / "iu.tgz", images=None)
    ar = {s.name: s for s in pl.plan(pl.get_pipeline_preset("tiny", dcd_teacher="ar"), opt)}
    cmd = ar["train/dcd_b8"].command
    assert f"--teacher {tmp_path / 'ar' / 'final'} --teacher-decoder ar" in cmd
    assert "train/ar" in ar["train/dcd_b8"].deps
    rad = {
        s.name: s
        for s in pl.plan(pl.get_pipeline_preset("tiny", dcd_teacher="rad", dcd_strategy="sequential"), opt)
    }
    assert "--teacher-decoder" not in rad["train/dcd_b8"].command
    assert "--strategy sequential" in rad["train/dcd_b8"].command
    with pytest.raises(UserError, match="dcd_teacher"):
        pl.get_pipeline_preset("tiny", dcd_teacher="gpt")
