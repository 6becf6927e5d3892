"""Clinical metrics: label/phantom F1 arithmetic, the labeler-backed adapters, CheXbert loading and scoring."""

from __future__ import annotations

import numpy as np
import pytest

from echocxr.data.observations import CHEXPERT14, OBSERVATIONS, Finding
from echocxr.errors import UserError
from echocxr.eval.bootstrap import bootstrap_ci
from echocxr.eval.metrics import compute, compute_all, labels
from echocxr.eval.metrics.semscore import minilm_path


def _vec(*observations: str) -> np.ndarray:
    return np.array([o in observations for o in OBSERVATIONS])


def test_f1_arithmetic_by_hand():
    pred = np.stack([_vec("cardiomegaly"), _vec("cardiomegaly", "calcified_granuloma"), _vec()])
    true = np.stack([_vec("cardiomegaly"), _vec("pleural_effusion", "calcified_granuloma"), _vec("edema")])
    total = labels.confusion(pred, true).sum(axis=0)
    micro, macro, per = labels.f1_scores(total)
    # tp: cardiomegaly, granuloma = 2; fp: cardiomegaly (study 2) = 1; fn: effusion, edema = 2
    assert micro == pytest.approx(2 * 2 / (2 * 2 + 1 + 2))
    assert per == pytest.approx(
        {"cardiomegaly": 2 / 3, "calcified_granuloma": 1.0, "pleural_effusion": 0.0, "edema": 0.0}
    )
    assert macro == pytest.approx((2 / 3 + 1 + 0 + 0) / 4)
    micro14, macro14, per14 = labels.f1_scores(total, np.array([o in CHEXPERT14 for o in OBSERVATIONS]))
    assert "calcified_granuloma" not in per14
    assert micro14 == pytest.approx(2 * 1 / (2 * 1 + 1 + 2)) and macro14 == pytest.approx((2 / 3) / 3)


def test_present_uncertain_variants():
    found = (("cardiomegaly", "positive"), ("edema", "uncertain"), ("pneumothorax", "negative"))
    assert set(np.array(OBSERVATIONS)[labels.present(found)]) == {"cardiomegaly"}
    assert set(np.array(OBSERVATIONS)[labels.present(found, uncertain_positive=True)]) == {
        "cardiomegaly",
        "edema",
    }


def test_phantom_f1_with_a_fixed_labeling(monkeypatch):
    # Exercises the phantom-truth bookkeeping with a known labeling of three texts, independent of
    # the project's labeler (tested with the real one below).
    table = {
        "a": (("cardiomegaly", "positive"),),
        "b": (("pleural_effusion", "positive"), ("pneumothorax", "negative")),
        "c": (),
    }
    monkeypatch.setattr(labels, "_labels", table.__getitem__)
    truth = [
        {"cardiomegaly": Finding("cardiomegaly", severity="mild")},
        {"pleural_effusion": {"status": "positive", "laterality": "left"}},  # JSON form is accepted
        {"pneumothorax": Finding("pneumothorax"), "edema": Finding("edema", status="negative")},
    ]
    result = labels.phantom_f1(["a", "b", "c"], ["", "", ""], truth=truth)
    agg = result.aggregate
    assert agg["phantom_f1/cardiomegaly"] == 1.0 and agg["phantom_f1/pneumothorax"] == 0.0
    assert "phantom_f1/edema" not in agg  # negative in the truth and never predicted: undefined
    assert agg["phantom_f1_micro"] == pytest.approx(2 * 2 / (2 * 2 + 0 + 1))
    assert agg["phantom_f1_macro"] == pytest.approx(2 / 3)
    assert [s["phantom_f1_sample_f1"] for s in result.per_sample] == [1.0, 1.0, 0.0]
    cis = bootstrap_ci(result, n_resamples=100, seed=0)
    assert cis["phantom_f1_micro"].lo <= agg["phantom_f1_micro"] <= cis["phantom_f1_micro"].hi
    with pytest.raises(UserError, match="truth 0"):
        labels.phantom_f1(["a"], [""], truth=[["cardiomegaly"]])
    with pytest.raises(UserError, match="bad finding"):
        labels.phantom_f1(["a"], [""], truth=[{"cardiomegaly": {"status": "likely"}}])


def test_label_f1_with_the_project_labeler():
    pytest.importorskip("echocxr.data.labeler")
    refs = [
        "Findings: Mild cardiomegaly. Small left pleural effusion. No pneumothorax.\nImpression: Cardiomegaly.",
        "Findings: The lungs are clear. No pleural effusion or pneumothorax.\nImpression: No acute disease.",
    ]
    same = compute("label_f1", refs, refs)
    assert same.aggregate["label_f1_micro"] == 1.0
    hyps = ["Findings: The lungs are clear. Heart size is normal.\nImpression: Normal chest.", refs[1]]
    worse = compute("label_f1", hyps, refs)
    assert worse.aggregate["label_f1_micro"] < 1.0
    truth = [{"cardiomegaly": Finding("cardiomegaly"), "pleural_effusion": Finding("pleural_effusion")}, {}]
    out = compute_all(["phantom_f1", "label_f1_upos"], refs, refs, truth=truth, bootstrap=50)
    assert out["phantom_f1_micro"]["value"] == 1.0
    assert out["phantom_f1/cardiomegaly"]["value"] == 1.0
    assert out["label_f1_upos_micro"]["value"] == 1.0


def test_chinese_english_side_metrics_use_zh_to_en():
    zh = pytest.importorskip("echocxr.data.zh")
    zh_refs = ["所见：心影增大。\n印象：心脏增大。", "所见：双肺清晰，无胸腔积液。\n印象：未见急性病变。"]
    result = compute("semscore_minilm", zh_refs, zh_refs, language="zh")
    assert list(result.aggregate) == ["semscore_minilm_zh2en"]
    assert result.aggregate["semscore_minilm_zh2en"] == pytest.approx(1.0, abs=1e-5)
    english = [zh.zh_to_en(t) for t in zh_refs]
    against_en = compute("semscore_minilm", zh_refs, english, language="zh", refs_en=english)
    assert against_en.aggregate["semscore_minilm_zh2en"] == pytest.approx(1.0, abs=1e-5)


# --- CheXbert: the loading and scoring code, run on a tiny random model in the checkpoint's format ---


@pytest.fixture(scope="module")
def tiny_chexbert(tmp_path_factory):
    import torch
    from transformers import AutoTokenizer, BertConfig

    from echocxr.eval.metrics.chexbert import build_model

    root = tmp_path_factory.mktemp("chexbert")
    bert = root / "bert-base-uncased"
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(bert)  # same uncased WordPiece vocab
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        initializer_range=0.5,  # large random weights, so different texts get clearly different states
    )
    config.save_pretrained(bert)
    torch.manual_seed(0)
    model = build_model(config)
    # Published checkpoints were saved from nn.DataParallel: every key carries "module.".
    state = {"module." + k: v for k, v in model.state_dict().items()}
    torch.save({"epoch": 1, "model_state_dict": state}, root / "chexbert.pth")
    broken = {k: v for k, v in state.items() if "linear_heads.13" not in k}
    torch.save({"model_state_dict": broken}, root / "broken.pth")
    (root / "garbage.pth").write_bytes(b"not a checkpoint")
    return root


REPORTS = [
    "Mild cardiomegaly with a small left pleural effusion.",
    "The lungs are clear. No pneumothorax.",
    "Right lower lobe consolidation.",
]


def test_chexbert_scores_run_on_a_checkpoint(tiny_chexbert):
    paths = {
        "chexbert_path": str(tiny_chexbert / "chexbert.pth"),
        "bert_base_path": str(tiny_chexbert / "bert-base-uncased"),
    }
    same = compute("sembscore_chexbert", REPORTS, REPORTS, **paths)
    assert same.aggregate["sembscore_chexbert"] == pytest.approx(1.0, abs=1e-5)
    diff = compute("sembscore_chexbert", REPORTS, REPORTS[::-1], **paths)
    assert diff.per_sample[1]["sembscore_chexbert"] == pytest.approx(1.0, abs=1e-5)  # middle pair is equal
    assert diff.per_sample[0]["sembscore_chexbert"] < 1.0 - 1e-4
    f1 = compute("f1_chexbert", REPORTS, REPORTS, **paths)
    assert set(f1.aggregate) == {
        "f1_chexbert_micro14",
        "f1_chexbert_macro14",
        "f1_chexbert_micro5",
        "f1_chexbert_macro5",
    }


def test_chexbert_f1_follows_sklearn():
    from sklearn.metrics import f1_score

    from echocxr.eval.metrics.chexbert import _TOP5, _sklearn_f1

    rng = np.random.default_rng(0)
    pred, true = rng.random((40, 14)) < 0.3, rng.random((40, 14)) < 0.3
    true[:, 2] = pred[:, 2] = False  # a label with nothing to count scores 0, as in sklearn
    for scope in (np.ones(14, bool), _TOP5):
        micro, macro = _sklearn_f1(pred, true, scope)
        assert micro == pytest.approx(
            f1_score(true[:, scope], pred[:, scope], average="micro", zero_division=0)
        )
        assert macro == pytest.approx(
            f1_score(true[:, scope], pred[:, scope], average="macro", zero_division=0)
        )


def test_chexbert_bad_checkpoints_are_user_errors(tiny_chexbert):
    bert = str(tiny_chexbert / "bert-base-uncased")
    with pytest.raises(UserError, match="does not match the CheXbert layout"):
        compute(
            "f1_chexbert",
            REPORTS,
            REPORTS,
            chexbert_path=str(tiny_chexbert / "broken.pth"),
            bert_base_path=bert,
        )
    with pytest.raises(UserError, match="cannot read a CheXbert checkpoint"):
        compute(
            "f1_chexbert",
            REPORTS,
            REPORTS,
            chexbert_path=str(tiny_chexbert / "garbage.pth"),
            bert_base_path=bert,
        )
