"""Chinese rendering of normalized reports and the deterministic way back."""

from __future__ import annotations

import re

from echocxr.data.labeler import label_report
from echocxr.data.normalize import normalize_report, out_of_vocabulary
from echocxr.data.zh import PHRASES, _zh_index, render_zh, zh_to_en, zh_to_en_detailed

LATIN_OK = {"PICC", "CT", "ICD", "X", "CVC", "ECG", "MRI", "PA", "AP", "COPD", "T", "L", "C"}


def _chinese_only(text: str) -> bool:
    return bool(re.search(r"[\u4e00-\u9fff]", text)) and all(
        w.upper() in LATIN_OK for w in re.findall(r"[A-Za-z]+", text)
    )


def _statuses(text: str) -> dict[str, str]:
    return {o: x.status for o, x in label_report(text).items()}


REPORTS = [
    (
        "Mild cardiomegaly. Small left pleural effusion. No pneumothorax. The osseous structures are intact.",
        "Cardiomegaly and left effusion.",
    ),
    ("Possible right lower lobe pneumonia. Low lung volumes. Old healed left rib fractures.", ""),
    (
        "Lungs are clear. Pacemaker in place. Calcified granuloma in the right upper lobe.",
        "No acute disease.",
    ),
    (
        "Biapical scarring. Degenerative changes of the thoracic spine. Tortuous aorta.",
        "Question pericardial effusion.",
    ),
]


def test_render_and_round_trip():
    for f, i in REPORTS:
        labels = label_report(f"{f}\n{i}")
        norm = normalize_report(f, i, labels)
        zh = render_zh(norm, labels)
        assert zh is not None, norm
        for key in ("findings", "impression"):
            assert _chinese_only(zh[key]), zh[key]
            back = zh_to_en(zh[key])
            assert back == norm[key]
            assert _statuses(back) == _statuses(norm[key])


def test_terms():
    labels = label_report("Small left pleural effusion. Moderate cardiomegaly. No pneumothorax.")
    zh = render_zh(normalize_report("Small left pleural effusion. Moderate cardiomegaly.", ""), labels)
    assert "左侧少量胸腔积液。" in zh["findings"]
    assert "中度心影增大。" in zh["findings"]
    assert "未见气胸。" in zh["findings"]


def test_untranslatable_gives_none():
    norm = {"findings": "Dense calcification of the left knee meniscus.", "impression": "Knee."}
    assert render_zh(norm, {}) is None


def test_refuses_a_sentence_that_contradicts_the_labels():
    labels = label_report("No pneumothorax.")
    assert render_zh({"findings": "Small left pneumothorax.", "impression": ""}, labels) is None


def test_every_phrase_the_normalizer_writes_has_a_translation():
    for zh in PHRASES.values():
        assert _chinese_only(zh), zh
    canonical_inputs = [
        "Elevated right hemidiaphragm.",
        "Eventration of the left hemidiaphragm.",
        "Minimal left upper lobe scarring.",
        "Surgical clips are present.",
        "Prominent epicardial fat.",
    ]
    for text in canonical_inputs:
        for s in out_of_vocabulary(text):
            assert s in PHRASES, s


def test_index_is_one_to_one():
    index = _zh_index()  # raises when two English sentences share a Chinese rendering
    assert len(index) == len(set(index.values()))


def test_unknown_chinese_kept_and_reported():
    text = "所见：未见气胸。左膝关节钙化。\n印象：心肺未见急性异常。"
    en, unknown = zh_to_en_detailed(text)
    assert (
        en == "Findings: No pneumothorax. 左膝关节钙化。\nImpression: No acute cardiopulmonary abnormality."
    )
    assert unknown == ["左膝关节钙化。"]


def test_coverage_on_real_archive(iu_archive):
    from echocxr.data.labeler_validate import read_iu_archive, zh_coverage

    res = zh_coverage(read_iu_archive(iu_archive))
    assert res["coverage"] >= 0.95, res
