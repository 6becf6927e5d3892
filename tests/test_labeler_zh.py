"""The Chinese labeler (issue 22 item 18): cues, scopes, NFKC, agreement with our renderer's
mapping, the hand-labelled sets, and its use by the eval label metrics for Chinese text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from echocxr.data.labeler_zh import label_report_zh, label_text, normalize_zh
from echocxr.errors import UserError

DATA = Path(__file__).parent / "data"


def statuses(text: str) -> dict[str, str]:
    return {o: f.status for o, f in label_report_zh(text).items()}


def test_issue_example():
    text = "双肺纹理清晰，未见明显实变及胸腔积液；心影不大。气管插管末端位于隆突上方４ｃｍ。考虑肺炎可能。"
    assert statuses(text) == {
        "consolidation": "negative",
        "pleural_effusion": "negative",
        "cardiomegaly": "negative",
        "support_devices": "positive",
        "pneumonia": "uncertain",
    }


def test_nfkc_full_width_text_labels_like_half_width():
    assert normalize_zh("隆突上方４ｃｍ，ＰＩＣＣ") == "隆突上方4cm,picc"
    full, half = "右侧胸腔积液，未见气胸；心影增大。", "右侧胸腔积液,未见气胸;心影增大。"
    assert (
        statuses(full)
        == statuses(half)
        == {
            "pleural_effusion": "positive",
            "pneumothorax": "negative",
            "cardiomegaly": "positive",
        }
    )


@pytest.mark.parametrize("cue", ["未见", "无", "未发现", "没有", "排除"])
def test_negation_cues(cue):
    assert statuses(f"{cue}气胸。")["pneumothorax"] == "negative"


@pytest.mark.parametrize(
    "text",
    [
        "考虑肺炎。",
        "肺炎可能。",
        "不除外肺炎。",
        "疑似肺炎。",
        "右下肺感染待排。",
        "不能排除肺炎。",
        "可疑肺炎。",
    ],
)
def test_uncertainty_cues(text):
    assert statuses(text)["pneumonia"] == "uncertain"


def test_scope_ends_at_punctuation_and_turning_words():
    assert statuses("未见气胸，右侧胸腔积液。") == {
        "pneumothorax": "negative",
        "pleural_effusion": "positive",
    }
    assert statuses("未见气胸但右侧胸腔积液。")["pleural_effusion"] == "positive"
    assert statuses("未见实变、胸腔积液或气胸。") == {
        "consolidation": "negative",
        "pleural_effusion": "negative",
        "pneumothorax": "negative",
        "no_finding": "positive",
    }
    assert statuses("左下肺斑片影，考虑肺炎。") == {"lung_opacity": "positive", "pneumonia": "uncertain"}


def test_negated_change_keeps_the_finding():
    for text in (
        "右侧胸腔积液，较前无明显变化。",
        "右侧胸腔积液较前无明显改变。",
        "左侧胸腔积液无明显增加。",
    ):
        assert statuses(text)["pleural_effusion"] == "positive", text
    assert statuses("心影无明显增大。")["cardiomegaly"] == "negative"  # the change-word is the finding
    assert statuses("右侧气胸已吸收。")["pneumothorax"] == "negative"
    assert statuses("左肺下叶不张。")["atelectasis"] == "positive"  # 不张's 不 is no negation


def test_alternatives_between_two_observations_only():
    assert statuses("左下叶不张或肺炎。") == {"atelectasis": "uncertain", "pneumonia": "uncertain"}
    assert statuses("肺结节或肿块。") == {"lung_lesion": "positive"}


def test_normal_study_and_no_finding():
    assert statuses("心肺未见明显异常。") == {"no_finding": "positive"}
    assert "no_finding" not in statuses("心肺未见明显异常。右侧胸腔积液。")


def test_mixed_english_and_chinese_text_is_read_whole():
    text = "Findings: Mild cardiomegaly. 未见气胸。右侧少量胸腔积液。"
    assert statuses(text) == {
        "cardiomegaly": "positive",
        "pneumothorax": "negative",
        "pleural_effusion": "positive",
    }
    assert label_text("Mild cardiomegaly.")["cardiomegaly"].status == "positive"


def test_agrees_with_the_zh_to_en_mapping_on_rendered_reports(iu_archive):
    """Our renderer's Chinese, labeled directly, gets the labels of its English mapping (measured on
    all 3386 rendered IU reports on 2026-12-02: 3386 agree; here the first 500 studies)."""
    from echocxr.data.labeler import label_report
    from echocxr.data.labeler_validate import read_iu_archive
    from echocxr.data.normalize import normalize_report
    from echocxr.data.zh import render_zh, zh_to_en

    checked = 0
    for rep in read_iu_archive(iu_archive)[:500]:
        labels = label_report(f"{rep.findings}\n{rep.impression}")
        norm = normalize_report(rep.findings, rep.impression, labels)
        zh = render_zh(norm, labels) if norm["findings"] else None
        if zh is None:
            continue
        text = f"所见：{zh['findings']}\n印象：{zh['impression']}"
        want = {o: f.status for o, f in label_report(zh_to_en(text)).items()}
        assert statuses(text) == want, text
        checked += 1
    assert checked > 400


def test_gold_sets_score_and_the_command(tmp_path, capsys):
    from echocxr.data.labeler_validate import read_zh_gold, score_zh_gold

    gold = score_zh_gold(read_zh_gold(DATA / "labeler_zh_gold.jsonl"))
    assert gold["sentences"] >= 150
    # Floors: measured 2026-12-02 (docs/LABELER.md section 6) less a margin.
    assert gold["exact"]["micro"]["precision"] >= 0.95 and gold["exact"]["micro"]["recall"] >= 0.95
    post = score_zh_gold(read_zh_gold(DATA / "labeler_zh_postfreeze.jsonl"))
    assert post["exact"]["micro"]["precision"] >= 0.93 and post["exact"]["micro"]["recall"] >= 0.72

    from echocxr.cli import main

    out = tmp_path / "zh.json"
    assert (
        main(
            ["data", "validate-labeler", "--zh-gold", str(DATA / "labeler_zh_gold.jsonl"), "--out", str(out)]
        )
        == 0
    )
    assert "sentences all right" in capsys.readouterr().out
    assert json.loads(out.read_text(encoding="utf-8"))["zh_gold"]["sentences"] == gold["sentences"]


def test_gold_file_errors_name_the_file_and_line(tmp_path):
    from echocxr.data.labeler_validate import read_zh_gold

    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"text": "无气胸。", "labels": {"pneumothorax": "negative"}}\n{"text": "x", "labels": {"pneumothorax": "likely"}}\n'
    )
    with pytest.raises(UserError, match=r"bad.jsonl:2"):
        read_zh_gold(bad)
    with pytest.raises(UserError, match="not found"):
        read_zh_gold(tmp_path / "missing.jsonl")


def test_eval_label_metrics_read_chinese_the_renderer_did_not_write():
    from echocxr.eval.metrics import compute

    refs = [
        "所见：右肺下叶实变，右侧少量胸腔积液。\n印象：考虑肺炎。",
        "所见：心影不大，双肺清晰。\n印象：心肺未见明显异常。",
    ]
    hyps = ["所见：右下肺实变，右侧胸腔少量积液。\n印象：肺炎可能。", "所见：心影增大。\n印象：心脏增大。"]
    same = compute("label_f1", refs, refs, language="zh")
    assert same.aggregate["label_f1_micro_zh2en"] == 1.0
    worse = compute("label_f1", hyps, refs, language="zh")
    assert 0.0 < worse.aggregate["label_f1_micro_zh2en"] < 1.0
