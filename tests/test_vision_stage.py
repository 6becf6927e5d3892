"""Stage 0 (train/vision.py): the head learns to see drawn findings, resume after a kill is exact,
Stage 1 continues from its checkpoint, and a pretrained checkpoint skips it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from echocxr.bench.vision_head import head_logits
from echocxr.cli import main
from echocxr.data.records import Record, load_corpus, write_jsonl
from echocxr.model.config import get_preset
from echocxr.model.vlm import EchoVLM
from echocxr.train import loop
from echocxr.train.vision import CLASSES, is_pretrained, label_vector
from helpers import killed_after_first_checkpoint

NORMAL = ("The heart is normal in size. The lungs are clear.", "No acute disease.")
ABNORMAL = ("The heart is enlarged. Large bilateral pleural effusions.", "Cardiomegaly and effusions.")
SICK = {"cardiomegaly": {"status": "positive"}, "pleural_effusion": {"status": "positive"}}


def record(i: int, sick: bool, split: str = "train") -> Record:
    # A non-IU source draws the positive entries of `labels` (findings_for_record).
    f, imp = ABNORMAL if sick else NORMAL
    labels = SICK if sick else {"no_finding": {"status": "positive"}}
    return Record(f"mimic:S{i}", f"mimic:S{i}", "mimic", split, "en", [], f, imp, labels)


def write_corpus(path, n=16):
    write_jsonl(path, [record(i, i % 2 == 1) for i in range(n)] + [record(99, False, "test")])
    return path


def vision_cli(corpus, out, *extra, stage="vision", init="tiny"):
    argv = ["train", "--stage", stage, "--init", init, "--corpus", str(corpus), "--out", str(out)]
    argv += ["--device", "cpu", "--no-progress", "--image-source", "phantom", "--log-every", "1"]
    return main(argv + [str(x) for x in extra])


def is_visual(key: str) -> bool:
    return key.startswith(("visual.", "model.visual."))  # saved key names differ across transformers


def log_rows(out):
    return [json.loads(s) for s in (out / loop.LOG_FILE).read_text().splitlines()]


def test_labels_follow_the_image_source():
    r = record(1, True)
    r.labels = {"edema": {"status": "positive"}, "fracture": {"status": "negative"}}
    real = label_vector(r, real=True)
    assert [c for c, v in zip(CLASSES, real) if v] == ["edema"]
    assert "no_finding" not in CLASSES and len(CLASSES) == 20
    iu = Record(
        "iu:CXR1", "iu:CXR1", "iu", mesh=["Cardiomegaly/mild"], labels={"edema": {"status": "positive"}}
    )
    assert [c for c, v in zip(CLASSES, label_vector(iu, real=False)) if v] == ["cardiomegaly"]


def test_head_learns_drawn_findings(tmp_path, capsys):
    """The loss falls, and on fresh renders of held-out studies the trained tower + head score
    sick studies above normal ones (AUROC; a head that learned only the label priors scores 0.5)."""
    corpus = write_corpus(tmp_path / "corpus.jsonl", n=32)
    out = tmp_path / "vision"
    args = ("--steps", 40, "--batch-size", 8, "--lr", "3e-3", "--warmup", 5)
    assert vision_cli(corpus, out, *args) == 0
    rows = log_rows(out)
    assert sum(r["bce"] for r in rows[-8:]) < 0.5 * sum(r["bce"] for r in rows[:8])

    # `echocxr bench vision-head` reads the same tower + head on held-out studies' eval renders.
    held = tmp_path / "held.jsonl"
    write_jsonl(held, [record(1000 + i, i % 2 == 1) for i in range(12)])
    capsys.readouterr()
    bench = ["bench", "vision-head", "--ckpt", str(out / "final"), "--corpus", str(held), "--seed", "7"]
    assert main(bench + ["--min-positives", "6"]) == 0
    got = json.loads(capsys.readouterr().out.splitlines()[0])
    assert got["studies"] == 12 and got["findings_in_macro"] == 2  # cardiomegaly and effusion, 6 each

    z, y = head_logits(out / "final", load_corpus(held), seed=7)
    k = CLASSES.index("cardiomegaly")
    sick, normal = z[y[:, k] > 0, k], z[y[:, k] == 0, k]
    auroc = (sick[:, None] > normal[None, :]).float().mean()  # pairs ranked right; 0.5 = blind
    assert auroc >= 0.75, (sick, normal)
    assert got["per_finding"]["cardiomegaly"]["auroc"] == pytest.approx(float(auroc), abs=1e-4)


def test_vision_head_bench_names_a_folder_without_a_head(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus.jsonl", n=2)
    assert main(["bench", "vision-head", "--ckpt", str(tmp_path), "--corpus", str(corpus)]) == 2
    err = capsys.readouterr().err
    assert "vision_head.safetensors: not found" in err and str(tmp_path) in err


def test_resume_after_kill_is_exact(tmp_path, monkeypatch):
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    args = ("--steps", 6, "--batch-size", 2, "--grad-accum", 2, "--lr", "3e-3", "--warmup", 2)
    args += ("--save-every", 3)
    assert vision_cli(corpus, tmp_path / "whole", *args) == 0

    with killed_after_first_checkpoint(monkeypatch):
        assert vision_cli(corpus, tmp_path / "killed", *args) == 130
    assert [p.name for p in loop.checkpoints(tmp_path / "killed")] == ["step_0000003"]
    assert vision_cli(corpus, tmp_path / "killed", *args, "--resume", "--workers", 1) == 0

    whole = load_file(tmp_path / "whole" / "final" / "model.safetensors")
    resumed = load_file(tmp_path / "killed" / "final" / "model.safetensors")
    assert whole.keys() == resumed.keys()
    for k in whole:
        assert torch.equal(whole[k], resumed[k]), k
    heads = [
        torch.load(loop.checkpoints(tmp_path / d)[-1] / loop.TRAINER_FILE, weights_only=False)
        for d in ("whole", "killed")
    ]
    assert heads[0]["step"] == heads[1]["step"] == 3
    a, b = log_rows(tmp_path / "whole"), log_rows(tmp_path / "killed")
    assert [r["step"] for r in b] == list(range(1, 7))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]


def test_ar_continues_from_the_warm_vision_tower(tmp_path):
    """Stage 0 moves only `visual` and keeps its head out of the checkpoint; Stage 1 from
    OUT/final starts from those vision weights (frozen here, so they must come through bitwise)."""
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    vis = tmp_path / "vision"
    assert vision_cli(corpus, vis, "--steps", 3, "--batch-size", 2, "--lr", "3e-3", "--warmup", 1) == 0
    warm = load_file(vis / "final" / "model.safetensors")
    assert not [k for k in warm if "vision_head" in k]
    meta = json.loads((vis / "final" / "echocxr.json").read_text())
    assert meta["stage"] == "vision" and meta["model"]["name"] == "tiny"

    _, tok, _, _ = EchoVLM.from_pretrained(vis / "final")
    EchoVLM.from_config(get_preset("tiny"), tok, seed=0).save_pretrained(tmp_path / "fresh")  # --init tiny
    fresh = load_file(tmp_path / "fresh" / "model.safetensors")
    moved = {k for k in warm if not torch.equal(warm[k], fresh[k])}
    assert moved and all(is_visual(k) for k in moved)
    assert any(".merger." in k for k in moved)

    ar = tmp_path / "ar"
    init = str(vis / "final")
    assert (
        vision_cli(corpus, ar, "--steps", 2, "--batch-size", 2, "--freeze-vision", stage="ar", init=init) == 0
    )
    after = load_file(ar / "final" / "model.safetensors")
    for k in warm:
        if is_visual(k):
            assert torch.equal(after[k], warm[k]), k
    assert any(not torch.equal(after[k], warm[k]) for k in warm if not is_visual(k))

    # --vision-from: a preset model on other report text gets the same tower and its own BPE.
    other = tmp_path / "other.jsonl"
    write_jsonl(other, [record(i, i % 2 == 1) for i in range(8)])
    copy = tmp_path / "ar_copy"
    args = ("--steps", 1, "--batch-size", 2, "--freeze-vision", "--vision-from", vis / "final")
    assert vision_cli(other, copy, *args, stage="ar") == 0
    copied = load_file(copy / "final" / "model.safetensors")
    assert all(torch.equal(copied[k], warm[k]) for k in warm if is_visual(k))
    assert json.loads((copy / "final" / "echocxr.json").read_text())["trained_on"] == "phantom"
    assert (copy / "tokenizer" / "tokenizer.json").is_file()  # fitted on this corpus


def test_vision_from_names_a_tower_that_does_not_fit(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    vis = tmp_path / "vision"
    assert vision_cli(corpus, vis, "--steps", 1, "--batch-size", 2) == 0
    capsys.readouterr()
    args = ("--steps", 1, "--vision-from", vis / "final")
    assert vision_cli(corpus, tmp_path / "ar", *args, stage="ar", init="mini") == 2
    assert (
        f"--vision-from {vis / 'final'}: its vision tower does not fit this preset" in capsys.readouterr().err
    )
    assert vision_cli(corpus, tmp_path / "ar2", *args, stage="ar", init=str(vis / "final")) == 2
    assert "--vision-from applies to a preset --init" in capsys.readouterr().err


def test_pretrained_checkpoint_skips_stage0(tmp_path, capsys):
    real = tmp_path / "qwen"
    real.mkdir()
    (real / "config.json").write_text("{}")
    assert is_pretrained(str(real)) and not is_pretrained("tiny")
    (real / "echocxr.json").write_text(json.dumps({"model": {"name": "tiny"}}))
    assert not is_pretrained(str(real))  # one of our own preset checkpoints: Stage 0 may continue it
    (real / "echocxr.json").unlink()
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    assert vision_cli(corpus, tmp_path / "out", "--steps", 1, init=str(real)) == 0
    assert "pretrained checkpoint" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()
    assert vision_cli(corpus, tmp_path / "frozen", "--steps", 1, "--freeze-vision") == 2
    assert "--stage vision trains the vision tower only" in capsys.readouterr().err
