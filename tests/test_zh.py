"""Chinese rendering of normalized reports and the deterministic way back."""

from __future__ import annotations

import re

from echocxr.data.labeler import label_report
from echocxr.data.normalize import normalize_report
from echocxr.data.zh import render_zh, zh_to_en, zh_to_en_detailed

LATIN_OK = {"PICC", "CT", "ICD", "X", "CVC", "ECG", "MRI", "PA", "AP", "COPD", "T", "L", "C"}


def _chinese_only(text: str) -> bool:
    return bool(re.search(r"[\u4e00-\u9fff]", text)) and all(
        w.upper() in LATIN_OK for w in re.findall(r"[A-Za-z]+", text)
    )


def test_render_and_round_trip():
    f = "Mild cardiomegaly. Small left pleural effusion. No pneumothorax. The osseous structures are intact."
    i = "Cardiomegaly and left effusion."
    labels = label_report(f"{f}\n{i}")
    norm = normalize_report(f, i, labels)
    zh = render_zh(norm, labels)
    assert zh is not None
    assert "心影增大" in zh["findings"] and "胸腔积液" in zh["findings"] and "未见气胸" in zh["findings"]
    assert _chinese_only(zh["findings"]) and _chinese_only(zh["impression"])
    back = zh_to_en(zh["findings"])
    assert back == norm["findings"]
    assert {o: x.status for o, x in label_report(back).items()} == {
        o: x.status for o, x in label_report(norm["findings"]).items()
    }


def test_untranslatable_gives_none():
    norm = {"findings": "Dense calcification of the left knee meniscus.", "impression": "Knee."}
    assert render_zh(norm, {}) is None


def test_unknown_chinese_kept_and_reported():
    text = "所见：未见气胸。左膝关节钙化。\n印象：心肺未见急性异常。"
    en, unknown = zh_to_en_detailed(text)
    assert (
        en == "Findings: No pneumothorax. 左膝关节钙化。\nImpression: No acute cardiopulmonary abnormality."
    )
    assert unknown == ["左膝关节钙化。"]
