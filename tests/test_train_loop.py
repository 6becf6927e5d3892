"""The shared training loop, its data stream and Stage 1 (AR): the loss against an unpadded
reference, the loss falls, exact resume after a kill, LoRA, the schedule, and clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from echocxr.batch import Example, collate
from echocxr.cli import main
from echocxr.data.records import Record, write_jsonl
from echocxr.errors import UserError
from echocxr.model.config import get_preset
from echocxr.model.image_processing import make_image_processor
from echocxr.model.tokenizer import train_bpe
from echocxr.model.vlm import EchoVLM
from echocxr.train import loop
from echocxr.train.ar import ar_logits, ar_loss
from echocxr.train.data import Layout, StudyStream
from helpers import killed_after_first_checkpoint, noise_image

REPORTS = [
    ("en", "The heart is normal in size. No pleural effusion. No pneumothorax.", "Normal chest."),
    ("en", "Mild cardiomegaly. Small left pleural effusion. No pneumothorax.", "Cardiomegaly with effusion."),
    ("en", "Right lower lobe consolidation. No effusion.", "Right lower lobe pneumonia."),
    ("en", "Calcified granuloma in the left upper lobe. Lungs otherwise clear.", "No acute disease."),
    ("zh", "心影大小正常。无胸腔积液。无气胸。", "胸部未见异常。"),
    ("zh", "轻度心脏增大。左侧少量胸腔积液。", "心脏增大伴积液。"),
]


def write_corpus(path, n=12):
    recs = []
    for i in range(n):
        lang, findings, impression = REPORTS[i % len(REPORTS)]
        sid = f"iu:CXR{i}"
        recs.append(
            Record(sid + ("#zh" if lang == "zh" else ""), sid, "iu", "train", lang, [], findings, impression)
        )
    recs.append(Record("iu:T1", "iu:T1", "iu", "test", "en", [], "No effusion.", "Normal."))
    write_jsonl(path, recs)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.jsonl")


def train_cli(corpus, out, *extra):
    argv = ["train", "--stage", "ar", "--init", "tiny", "--corpus", str(corpus), "--out", str(out)]
    argv += ["--device", "cpu", "--no-progress", "--image-source", "phantom", "--log-every", "1"]
    return main(argv + [str(x) for x in extra])


def log_rows(out):
    return [json.loads(s) for s in (out / loop.LOG_FILE).read_text().splitlines()]


# -- the AR objective ------------------------------------------------------------------------------


def test_ar_loss_matches_unpadded_rows():
    """A left-padded batch (an English and a longer Chinese prompt, two images vs one) gives each
    row the logits it gets alone, and the loss counts tokens up to the first EOS only."""
    torch.manual_seed(0)
    tok = train_bpe([f"{f} {i}" for _, f, i in REPORTS] * 5, 400)
    cfg = get_preset("tiny")
    model = EchoVLM.from_config(cfg, tok, seed=0, dtype=torch.float64)
    proc = make_image_processor(cfg.image_size)
    rng = np.random.default_rng(0)
    img = lambda: noise_image(rng)  # noqa: E731
    exs = [
        Example([img()], "en", "Findings: No effusion.\nImpression: Normal."),
        Example([img(), img()], "zh", "所见：无气胸。心影大小正常。\n印象：胸部未见异常。"),
    ]
    batch = collate(exs, tok, proc, cfg.image_tokens)
    assert not bool(batch.prompt_valid.all())  # the English row is left-padded
    logits = ar_logits(model, batch)
    total, count = 0.0, 0
    for b, ex in enumerate(exs):
        one = collate([ex], tok, proc, cfg.image_tokens)
        ref = ar_logits(model, one)  # no padding: plain causal attention
        n = int(one.response_len[0])
        torch.testing.assert_close(logits[b, :n], ref[0, :n], rtol=1e-9, atol=1e-9)
        total += F.cross_entropy(ref[0, :n], one.response_ids[0, :n], reduction="sum").item()
        count += n
    loss, logs = ar_loss(model, batch)
    assert logs["targets"] == count < batch.response_ids.numel()  # EOS padding is not a target
    assert loss.item() == pytest.approx(total / count, rel=1e-6)  # the loss is taken in fp32


def test_schedule_warmup_then_cosine():
    f = loop.warmup_cosine(10, 110, 0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)


def test_stream_layout_splits_a_global_batch(corpus):
    """Rank r of W with batch B reads what one process with batch W*B reads, every epoch reshuffled."""
    one = Layout(batch_size=4, grad_accum=1, world=1, rank=0)
    ranks = [Layout(batch_size=2, grad_accum=1, world=2, rank=r) for r in (0, 1)]
    accum = Layout(batch_size=2, grad_accum=2, world=1, rank=0)
    for step in range(5):
        assert (
            [one.start(step, 0) + i for i in range(4)]
            == [ranks[r].start(step, 0) + i for r in (0, 1) for i in range(2)]
            == [accum.start(step, m) + i for m in (0, 1) for i in range(2)]
        )
    tok = train_bpe([f for _, f, _ in REPORTS] * 5, 400)
    cfg = get_preset("tiny")
    s = StudyStream(
        corpus,
        tokenizer=tok,
        processor=make_image_processor(56),
        tokens_per_image=cfg.image_tokens,
        image_size=56,
        seed=3,
        image_source="phantom",
    )
    n = len(s)
    assert n == 12  # the test split is not trained on
    epoch0 = [s.example(k).record_id for k in range(n)]
    epoch1 = [s.example(n + k).record_id for k in range(n)]
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1
    a, b = s.example(0), s.example(n + epoch1.index(epoch0[0]))  # the same study, next epoch
    assert a.record_id == b.record_id and a.images[0].tobytes() != b.images[0].tobytes()
    assert s.example(0).images[0].tobytes() == a.images[0].tobytes()  # deterministic


def test_repeat_abnormal_oversamples_studies_with_a_finding(tmp_path):
    """--repeat-abnormal 3: a study whose report has an abnormal positive label appears 3 times per
    epoch, each copy with its own phantom render; normal studies once; 1 keeps the plain stream."""
    sick = {"cardiomegaly": {"status": "positive"}, "no_finding": {"status": "negative"}}
    normal = {"no_finding": {"status": "positive"}, "pleural_effusion": {"status": "negative"}}
    recs = [
        Record(
            f"mimic:S{i}",
            f"mimic:S{i}",
            "mimic",
            "train",
            "en",
            [],
            "Text.",
            "Imp.",
            sick if i < 2 else normal,
        )
        for i in range(5)
    ]
    path = tmp_path / "corpus.jsonl"
    write_jsonl(path, recs)
    tok = train_bpe(["Text. Imp."] * 5, 300)
    kw = dict(tokenizer=tok, processor=make_image_processor(56), tokens_per_image=4, image_size=56)
    s = StudyStream(path, seed=1, image_source="phantom", repeat_abnormal=3, **kw)
    assert len(s) == 2 * 3 + 3
    epoch = [s.example(k) for k in range(len(s))]
    ids = [e.record_id for e in epoch]
    assert ids.count("mimic:S0") == ids.count("mimic:S1") == 3 and ids.count("mimic:S4") == 1
    renders = {e.images[0].tobytes() for e in epoch if e.record_id == "mimic:S0"}
    assert len(renders) == 3  # copies are not the same picture
    plain = StudyStream(path, seed=1, image_source="phantom", **kw)
    assert len(plain) == 5 and s.image_counts(len(s)) == {"real": 0, "phantom": 9}
    with pytest.raises(UserError, match="--repeat-abnormal"):
        StudyStream(path, repeat_abnormal=0, **kw)


# -- the CLI ---------------------------------------------------------------------------------------


def test_ar_training_loss_falls_and_checkpoint_loads(corpus, tmp_path):
    out = tmp_path / "ar"
    assert train_cli(corpus, out, "--steps", 30, "--batch-size", 4, "--lr", "3e-3", "--warmup", 3) == 0
    rows = log_rows(out)
    assert [r["step"] for r in rows] == list(range(1, 31))
    first, last = np.mean([r["loss"] for r in rows[:3]]), np.mean([r["loss"] for r in rows[-3:]])
    assert last < 0.6 * first
    assert all(r["tokens_per_s"] > 0 and r["lr"] > 0 and r["memory_mb"] > 0 for r in rows)
    model, tok, proc, meta = EchoVLM.from_pretrained(out / "final")
    assert meta["stage"] == "ar" and meta["train"]["steps"] == 30 and meta["model"]["name"] == "tiny"
    assert len(tok) <= get_preset("tiny").vocab_size + 8  # the corpus BPE, not a borrowed tokenizer


def test_resume_after_kill_is_exact(corpus, tmp_path, monkeypatch):
    """A run killed right after its step-4 checkpoint and resumed ends with the same weights as
    an uninterrupted run (grad accumulation and workers on, to cover the data position)."""
    args = (
        "--steps",
        7,
        "--batch-size",
        2,
        "--grad-accum",
        2,
        "--lr",
        "2e-3",
        "--warmup",
        2,
        "--save-every",
        4,
    )
    assert train_cli(corpus, tmp_path / "whole", *args) == 0

    with killed_after_first_checkpoint(monkeypatch):
        assert train_cli(corpus, tmp_path / "killed", *args) == 130
    assert not (tmp_path / "killed" / "final").exists()
    assert [p.name for p in loop.checkpoints(tmp_path / "killed")] == ["step_0000004"]
    assert train_cli(corpus, tmp_path / "killed", *args, "--resume", "--workers", 1) == 0

    whole = load_file(tmp_path / "whole" / "final" / "model.safetensors")
    resumed = load_file(tmp_path / "killed" / "final" / "model.safetensors")
    assert whole.keys() == resumed.keys()
    for k in whole:
        assert torch.equal(whole[k], resumed[k]), k
    a, b = log_rows(tmp_path / "whole"), log_rows(tmp_path / "killed")
    assert [r["step"] for r in b] == list(range(1, 8))  # steps 1-4 before the kill, 5-7 after
    assert [r["loss"] for r in a] == [r["loss"] for r in b]


def test_lora_trains_adapters_and_merges(corpus, tmp_path, capsys):
    out = tmp_path / "lora"
    assert (
        train_cli(
            corpus, out, "--steps", 4, "--batch-size", 2, "--lora-rank", 4, "--lr", "1e-2", "--warmup", 1
        )
        == 0
    )
    said = capsys.readouterr().out
    trainable, total = (
        int(x.replace(",", "")) for x in said.split("train ar: ")[1].split(" parameters")[0].split(" of ")
    )
    assert 0 < trainable < total / 5
    weights = load_file(out / "final" / "model.safetensors")
    assert not [k for k in weights if "lora" in k or "base_layer" in k]
    merged, tok, _, _ = EchoVLM.from_pretrained(out / "final")
    fresh = EchoVLM.from_config(get_preset("tiny"), tok, seed=0)  # --init tiny with --seed 0
    now, before = dict(merged.named_parameters()), dict(fresh.named_parameters())
    assert now.keys() == before.keys()
    moved = {k for k in now if not torch.equal(now[k], before[k])}
    assert moved and all(".language_model.layers." in k and k.endswith("proj.weight") for k in moved)


def test_user_errors(corpus, tmp_path, capsys):
    assert train_cli(tmp_path / "nope.jsonl", tmp_path / "a", "--steps", 1) == 2
    assert "nope.jsonl: corpus file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"record_id": "x"}\nnot json\n')
    assert train_cli(bad, tmp_path / "b", "--steps", 1) == 2
    assert "bad.jsonl:" in capsys.readouterr().err
    argv = ["train", "--stage", "ar", "--init", str(tmp_path / "missing"), "--corpus", str(corpus)]
    assert main(argv + ["--out", str(tmp_path / "c"), "--steps", "1", "--device", "cpu"]) == 2
    assert "neither a preset" in capsys.readouterr().err
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert main(argv[:4] + [str(other)] + argv[5:] + ["--out", str(tmp_path / "d"), "--steps", "1"]) == 2
    assert "'llama' is not supported" in capsys.readouterr().err
    # a second run into a folder with checkpoints must say --resume, and a resume must repeat the run
    args = ("--steps", 3, "--batch-size", 2, "--save-every", 1, "--warmup", 0)
    assert train_cli(corpus, tmp_path / "e", *args) == 0
    assert train_cli(corpus, tmp_path / "e", *args) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert train_cli(corpus, tmp_path / "e", "--steps", 3, "--batch-size", 4, "--resume") == 2
    assert "batch_size: 2 -> 4" in capsys.readouterr().err
    # --fsdp outside torchrun, and with LoRA, are one-line errors
    assert train_cli(corpus, tmp_path / "e", *args, "--resume", "--fsdp") == 2
    assert "--fsdp needs torchrun" in capsys.readouterr().err
    assert train_cli(corpus, tmp_path / "f", "--steps", 1, "--fsdp", "--lora-rank", 4) == 2
    assert "train LoRA adapters without it" in capsys.readouterr().err


def test_resume_must_repeat_fsdp(tmp_path):
    base = {k: 1 for k in loop.RESUME_KEYS if k != "fsdp"}
    loop.check_resumable(base, {**base, "fsdp": False}, tmp_path)  # saved before the key existed
    with pytest.raises(UserError, match="fsdp: False -> True"):
        loop.check_resumable(base, {**base, "fsdp": True}, tmp_path)


def test_rad_and_dcd_resume_exactly(corpus, tmp_path, monkeypatch):
    """Stages with their own randomness (RAD's noise) and state (DCD's rollouts, collected once at
    step 0 and restored from the checkpoint, not collected again) also resume bitwise."""
    assert train_cli(corpus, tmp_path / "ar", "--steps", 2, "--batch-size", 2, "--warmup", 0) == 0
    init = {"rad": tmp_path / "ar" / "final", "dcd": tmp_path / "rad" / "final"}
    extra = {
        "rad": ["--block-size", 4],
        "dcd": ["--block-size", 4, "--distill-studies", 4, "--max-new-tokens", 8],
    }
    for stage in ("rad", "dcd"):
        args = ["--stage", stage, "--init", init[stage], "--steps", 4, "--batch-size", 2, "--warmup", 1]
        args += ["--save-every", 2, *extra[stage]]

        def run(out, *more, args=args):
            argv = ["train", "--corpus", str(corpus), "--out", str(out), "--device", "cpu", "--no-progress"]
            argv += ["--image-source", "phantom", "--log-every", "1"]
            return main(argv + [str(x) for x in args + list(more)])

        assert run(tmp_path / stage) == 0

        with killed_after_first_checkpoint(monkeypatch):
            assert run(tmp_path / f"{stage}_killed") == 130
        assert run(tmp_path / f"{stage}_killed", "--resume") == 0
        a = load_file(tmp_path / stage / "final" / "model.safetensors")
        b = load_file(tmp_path / f"{stage}_killed" / "final" / "model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), stage
        la, lb = log_rows(tmp_path / stage), log_rows(tmp_path / f"{stage}_killed")
        assert [r["loss"] for r in la] == [r["loss"] for r in lb], stage
    meta = json.loads((tmp_path / "dcd_killed" / "final" / "echocxr.json").read_text())
    assert len(meta["dcd_rounds"]) == 1  # the resumed run did not collect its rollouts again
    # trained_on (issue #16): counted by the AR and RAD streams (all phantoms), carried into DCD,
    # which draws its own images and does not count them
    assert meta["trained_on"] == "phantom"
    assert meta["image_counts"] == {
        "ar": {"real": 0, "phantom": 4},
        "rad": {"real": 0, "phantom": 8},
        "dcd": None,
    }
