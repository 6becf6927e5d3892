"""`echocxr eval` on a tiny random model and a tiny phantom corpus; plots; EOS confidence."""

from __future__ import annotations

import json

import pytest
import torch

from echocxr.data.records import ImageRef, Record, write_jsonl
from echocxr.errors import UserError
from echocxr.eval import evaluate as ev
from echocxr.eval import plots

FAST_METRICS = ("bleu_coco", "rougeL_rouge_score", "phantom_f1")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A saved random tiny checkpoint and a 5-study eval file (IU MeSH -> phantom truth)."""
    from echocxr.model.config import get_preset
    from echocxr.model.image_processing import make_image_processor
    from echocxr.model.tokenizer import train_bpe
    from echocxr.model.vlm import EchoVLM

    root = tmp_path_factory.mktemp("eval")
    texts = ["Findings: The lungs are clear. No pleural effusion. Impression: No acute disease."] * 8
    tok = train_bpe(texts + ["所见：心肺未见异常。印象：无急性病变。"] * 4, 400)
    cfg = get_preset("tiny", max_response_tokens=12)
    model = EchoVLM.from_config(cfg, tok)
    model.save_pretrained(root / "ckpt", tok, make_image_processor(cfg.image_size), extra={"block_size": 4})
    mesh = [["normal"], ["Cardiomegaly/mild"], ["Pleural Effusion/right"], ["normal"], ["Cardiomegaly"]]
    records = [
        Record(
            record_id=f"iu:CXR{i}",
            study_id=f"iu:CXR{i}",
            source="iu",
            split="test" if i < 5 else "train",
            findings="The lungs are clear.",
            impression="No acute disease.",
            mesh=mesh[i % 5],
            images=[ImageRef(f"missing{i}.png", "PA")],
        )
        for i in range(6)
    ]
    write_jsonl(root / "eval_en.jsonl", records)
    return root, model, tok


def _cfg(root, out="ev", **kw):
    base = dict(
        ckpt=str(root / "ckpt"),
        corpus=str(root / "eval_en.jsonl"),
        out=str(root / out),
        batch_size=2,
        metrics=FAST_METRICS,
        bootstrap=20,
    )
    return ev.EvalConfig(**{**base, **kw})


def test_eval_writes_samples_and_aggregate_then_resumes(tiny, monkeypatch):
    pytest.importorskip("echocxr.decode.ar")
    root, _, _ = tiny
    agg = ev.evaluate(_cfg(root, limit=3), progress=False)
    out = root / "ev"
    samples = [json.loads(line) for line in (out / ev.SAMPLES).read_text().splitlines()]
    assert [s["record_id"] for s in samples] == ["iu:CXR0", "iu:CXR1", "iu:CXR2"]
    s = samples[1]
    assert s["image_source"] == "phantom" and s["truth"] == {
        "cardiomegaly": {"status": "positive", "severity": "mild"}
    }
    assert s["reference"].startswith("Findings: The lungs are clear.")
    assert 1 <= s["decode"]["tokens"] <= 12 and s["decode"]["batch_forwards"] >= 1
    assert "rougeL_rouge_score" in s["metrics"]
    assert agg["speed"]["samples"] == 3 and agg["speed"]["tokens_per_s"] > 0
    # AR: one forward per generated token after the prefill's first prediction
    assert 0.5 <= agg["speed"]["forwards_per_token"] <= 1.0
    en = agg["metrics"]["en"]
    assert "bleu4_coco" in en and en["bleu4_coco"]["ci95"] is not None
    assert "phantom_f1_micro" in en
    assert (out / ev.AGGREGATE_MD).read_text().count("| bleu4_coco |") == 1

    # Rerun with a larger limit: only the two new studies are decoded.
    decoded = []
    real = ev.decode_batch
    monkeypatch.setattr(ev, "decode_batch", lambda recs, *a: decoded.extend(recs) or real(recs, *a))
    agg = ev.evaluate(_cfg(root, limit=5), progress=False)
    assert [r.record_id for r in decoded] == ["iu:CXR3", "iu:CXR4"]
    assert agg["speed"]["samples"] == 5
    lines = (out / ev.SAMPLES).read_text().splitlines()
    assert len(lines) == 5 and all("metrics" in json.loads(x) for x in lines)


def test_eval_refuses_other_settings_in_the_same_folder(tiny):
    root, _, _ = tiny
    out = root / "ev_settings"
    ev._check_settings(out, _cfg(root, out="ev_settings").fingerprint())
    with pytest.raises(UserError, match="decoder"):
        ev._check_settings(out, _cfg(root, out="ev_settings", decoder="block").fingerprint())


def test_torn_last_line_is_decoded_again(tmp_path):
    p = tmp_path / "samples.jsonl"
    p.write_text('{"record_id": "a"}\n{"record_id": "b"}\n{"record_')
    assert [s["record_id"] for s in ev.read_samples(p)] == ["a", "b"]
    p.write_text('{"record_id": "a"}\nnot json\n{"record_id": "b"}\n')
    with pytest.raises(UserError, match="samples.jsonl:2"):
        ev.read_samples(p)


def test_records_by_split_and_limit(tiny):
    root, _, _ = tiny
    assert len(ev.load_records(_cfg(root))) == 5
    assert len(ev.load_records(_cfg(root, split="all"))) == 6
    assert len(ev.load_records(_cfg(root, limit=2))) == 2
    with pytest.raises(UserError, match="no records with split 'val'"):
        ev.load_records(_cfg(root, split="val"))


def test_speed_summary_shares_batch_cost():
    def s(tokens, B, fwd, longest, sec):
        return {
            "decode": {
                "tokens": tokens,
                "batch_size": B,
                "batch_forwards": fwd,
                "batch_longest": longest,
                "batch_seconds": sec,
                "ended": True,
            }
        }

    # one batch of two rows (10 and 6 tokens, 10 forwards, 2 s) and one single row (4 tokens, 1 forward, 1 s)
    rows = [s(10, 2, 10, 10, 2.0), s(6, 2, 10, 10, 2.0), s(4, 1, 1, 4, 1.0)]
    sp = ev.speed_summary(rows)
    assert sp["tokens"] == 20 and sp["seconds"] == pytest.approx(3.0)
    assert sp["tokens_per_s"] == pytest.approx(20 / 3)
    assert sp["forwards_per_token"] == pytest.approx(11 / 14)


def test_eos_confidence_counts_positions(tiny):
    from echocxr.batch import Example, collate
    from echocxr.model.image_processing import make_image_processor

    root, model, tok = tiny
    img = __import__("PIL.Image", fromlist=["Image"]).new("L", (56, 56), 128)
    reports = ["Findings: The lungs are clear.", "Findings: The lungs are clear. No pleural effusion."]
    batch = collate(
        [Example([img], "en", r) for r in reports],
        tok,
        make_image_processor(56),
        model.config.image_tokens,
        multiple_of=4,
    )
    conf = ev.eos_confidence(model, batch, 4)
    lens = batch.response_len.tolist()
    assert len(conf["content"]) == sum(n - 1 for n in lens)
    assert len(conf["eos"]) == sum(-(-n // 4) * 4 - (n - 1) for n in lens)
    assert all(0.0 <= p <= 1.0 for p in conf["eos"] + conf["content"])

    # Row 0's EOS confidence equals a direct forward of its last block with the block masked.
    from echocxr.decode.common import prefill, text_positions, with_padding
    from echocxr.model.masks import decode_block

    n = lens[0]
    first = (n - 1) // 4 * 4  # start of the block holding the first EOS
    one = collate(
        [Example([img], "en", reports[0])],
        tok,
        make_image_processor(56),
        model.config.image_tokens,
        multiple_of=4,
    )
    from echocxr.train.rad import logits_for_block

    # the decoders' reading: token j of the block from slot j-1, token 0 from the last clean token
    with torch.no_grad():
        pre = prefill(model, one, 64)
        P = pre.cache.length
        before = pre.last_logits
        clean = one.response_ids[:, :first]
        if first:
            pos = text_positions(pre.next_pos, 0, first)
            pre.cache.key_valid[:, P : P + first] = True
            hc = model(
                model.embed(clean), pos, with_padding(pre.cache, decode_block(P, first, 4)), cache=pre.cache
            )
            pre.cache.commit(first)
            before = model.logits(hc[:, -1])
        masked = torch.full((1, 4), model.special.mask)
        pre.cache.key_valid[:, P + first : P + first + 4] = True
        h = model(
            model.embed(masked),
            text_positions(pre.next_pos, first, 4),
            with_padding(pre.cache, decode_block(P + first, 4, 4)),
            cache=pre.cache,
        )
        p = logits_for_block(model, h, before).softmax(-1)[0]
    ref = one.response_ids[0, first : first + 4]
    direct = p[torch.arange(4), ref][n - 1 - first :]
    assert torch.allclose(torch.tensor(conf["eos"][: len(direct)]), direct, atol=1e-5)
    s = ev.summarize_confidence(conf)
    assert s["eos_n"] == len(conf["eos"]) and 0 <= s["eos"] <= 1


def test_pareto_front_and_plots(tmp_path):
    pts = [(10.0, 0.3), (40.0, 0.25), (5.0, 0.1), (40.0, 0.2)]
    assert plots.pareto_front(pts) == [0, 1]
    # forwards per token: lower is better
    assert plots.pareto_front([(1.0, 0.3), (0.25, 0.25), (2.0, 0.1)], x_higher_better=False) == [1, 0]
    points = [
        {"label": "ar", "tokens_per_s": 10.0, "rougeL_coco": 0.3},
        {"label": "onestep", "tokens_per_s": 40.0, "rougeL_coco": 0.25},
        {"label": "broken", "tokens_per_s": None, "rougeL_coco": 0.2},
    ]
    p = plots.pareto_plot(points, tmp_path / "pareto.png")
    e = plots.eos_confidence_plot(
        {
            4: {"eos": 0.4, "content": 0.8, "eos_se": 0.05, "content_se": 0.01, "eos_n": 5, "content_n": 50},
            8: {"eos": 0.3, "content": 0.7, "eos_se": 0.05, "content_se": 0.01, "eos_n": 9, "content_n": 50},
        },
        tmp_path / "eos.png",
    )
    for path in (p, e):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_commit_confidences_read_the_block_trajectory(tiny):
    """Every committed token of a row appears once with its commit-time confidence."""
    from echocxr.batch import Example, collate
    from echocxr.decode.api import DecodeConfig, generate
    from echocxr.model.image_processing import make_image_processor

    root, model, tok = tiny
    img = __import__("PIL.Image", fromlist=["Image"]).new("L", (56, 56), 128)
    batch = collate(
        [Example([img], "en"), Example([img], "zh")], tok, make_image_processor(56), model.config.image_tokens
    )
    dc = DecodeConfig(decoder="block", block_size=4, steps=2, max_new_tokens=8, record_trajectory=True)
    out = generate(model.eval(), batch, dc)
    eos = model.special.eos
    for row in range(2):
        commits = ev.commit_confidences(out.trajectory, row, eos)
        steps = [s for blk in out.trajectory[row] for s in blk]
        assert len(commits) == sum(len(s.tokens) for s in steps) == 4 * len(out.trajectory[row])
        assert [c for _, c in commits] == [c for s in steps for c in s.confidence]
        assert all(0.0 <= c <= 1.0 for _, c in commits)
    assert ev.commit_confidences(None, 0, eos) is None


def test_eval_image_blind_controls_keep_the_truth(tiny):
    pytest.importorskip("echocxr.decode.ar")
    root, _, _ = tiny
    own = {r.record_id: ev.phantom_truth(r, 0) for r in ev.load_records(_cfg(root, limit=3))}
    for source in ev.CONTROL_SOURCES:
        cfg = _cfg(
            root, out=f"ev_{source}", limit=3, batch_size=3, image_source=source, metrics=("phantom_f1",)
        )
        agg = ev.evaluate(cfg, progress=False)
        assert agg["image_source"] == source and "phantom_f1_micro" in agg["metrics"]["en"]
        assert agg["reports"]["en"]["samples"] == 3 and 1 <= agg["reports"]["en"]["distinct"] <= 3
        samples = [json.loads(x) for x in (root / f"ev_{source}" / ev.SAMPLES).read_text().splitlines()]
        assert [s["record_id"] for s in samples] == list(own)
        for s in samples:
            assert s["image_source"] == source
            assert s["truth"] == own[s["record_id"]]  # scored against the study's own phantom
            assert s["image_from"] != s["study_id"] and (s["image_from"] is None) == (source == "blank")
        assert "--image-source " + source in agg["command"]
    # The derangement depends on the evaluated set, so a shuffled run keeps its --limit.
    with pytest.raises(UserError, match="limit"):
        ev._check_settings(
            root / "ev_shuffled", _cfg(root, out="ev_shuffled", image_source="shuffled").fingerprint()
        )
