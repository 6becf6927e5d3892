"""Report normalization: explicit negatives, positives kept, no de-identification marks."""

from __future__ import annotations

from echocxr.data.labeler import label_report
from echocxr.data.normalize import ALWAYS_NEGATED, NEGATIVE_SENTENCES, NO_ACUTE, normalize_report

ORIG_F = (
    "Mild cardiomegaly. There is no pneumothorax. Surgical clips in the right upper quadrant. "
    "Old healed XXXX rib fracture."
)
ORIG_I = "Cardiomegaly without edema."


def test_negatives_are_explicit_and_positives_kept():
    out = normalize_report(ORIG_F, ORIG_I)
    assert "Mild cardiomegaly." in out["findings"]
    for obs in ALWAYS_NEGATED:
        if obs != "cardiomegaly":
            assert NEGATIVE_SENTENCES[obs] in out["findings"]
    assert "No cardiomegaly." not in out["findings"]
    assert "Surgical clips in the right upper quadrant." in out["findings"]
    assert "fracture" in out["findings"].lower()
    assert out["impression"].startswith("Mild cardiomegaly.")


def test_no_deidentification_marks_and_deterministic():
    a = normalize_report(ORIG_F + " The XXXX are normal. Normal chest x-XXXX.", "XXXX XXXX.")
    b = normalize_report(ORIG_F + " The XXXX are normal. Normal chest x-XXXX.", "XXXX XXXX.")
    assert a == b
    assert "XXXX" not in a["findings"] + a["impression"]
    assert "xxxx" not in (a["findings"] + a["impression"]).lower()


def test_normal_report():
    out = normalize_report("The lungs are clear. Heart size normal.", "Normal chest.")
    assert out["impression"] == NO_ACUTE
    assert out["findings"].startswith("No cardiomegaly.")


def test_labels_of_normalized_text_agree():
    f, i = "Small left pleural effusion. Possible right lower lobe pneumonia.", "Effusion."
    labels = label_report(f"{f}\n{i}")
    out = normalize_report(f, i, labels)
    again = label_report(out["findings"])
    for obs, fnd in labels.items():
        if obs != "no_finding":
            assert again[obs].status == fnd.status, obs
    assert again["pneumothorax"].status == "negative"
