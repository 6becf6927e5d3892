"""Report normalization: explicit negatives, positives kept, no de-identification marks."""

from __future__ import annotations

import itertools

import pytest

from echocxr.data.labeler import label_report
from echocxr.data.normalize import (
    ALWAYS_NEGATED,
    NEGATIVE_SENTENCES,
    NO_ACUTE,
    finding_sentence,
    normalize_report,
    out_of_vocabulary,
)
from echocxr.data.observations import LATERALITIES, OBSERVATIONS, SEVERITIES, SUBTYPES, ZONES, Finding

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
    # Out-of-vocabulary positives are kept (here in their canonical wording).
    assert "Surgical clips in the upper abdomen." in out["findings"]
    # An old fracture stays, as healed, and is not called acute.
    assert "Healed rib fracture." in out["findings"] and "No acute fracture." in out["findings"]
    assert out["impression"] == "Mild cardiomegaly. Healed rib fracture."


def test_unknown_positive_sentence_is_kept_cleaned():
    out = normalize_report("Heart size normal. There is a  small lipoma in the left  axilla ,", "")
    assert out["findings"].startswith("There is a small lipoma in the left axilla.")


def test_no_deidentification_marks_and_deterministic():
    f = ORIG_F + " The XXXX are normal. Normal chest x-XXXX. XXXX XXXX surgical XXXX."
    a = normalize_report(f, "XXXX XXXX.")
    assert a == normalize_report(f, "XXXX XXXX.")
    assert "xxxx" not in (a["findings"] + a["impression"]).lower()


def test_normal_report():
    out = normalize_report("The lungs are clear. Heart size normal.", "Normal chest.")
    assert out["impression"] == NO_ACUTE
    assert out["findings"].startswith("No cardiomegaly.")
    assert "Possible" not in out["findings"]


def test_normal_and_meta_sentences_outside_the_vocabulary_are_not_kept():
    text = (
        "PA and lateral views of the chest were obtained. Low lung volumes, otherwise clear. "
        "No scarring. The osseous structures are grossly intact. Correlate clinically."
    )
    assert out_of_vocabulary(text) == [
        "Low lung volumes.",
        "The osseous structures are intact.",
        "Clinical correlation is recommended.",
    ]


def test_hedged_out_of_vocabulary_finding():
    assert out_of_vocabulary("Question pericardial effusion.") == ["Possible pericardial effusion."]


def test_labels_of_normalized_text_agree():
    f, i = "Small left pleural effusion. Possible right lower lobe pneumonia.", "Effusion."
    labels = label_report(f"{f}\n{i}")
    out = normalize_report(f, i, labels)
    again = label_report(out["findings"])
    for obs, fnd in labels.items():
        if obs != "no_finding":
            assert again[obs] == fnd, obs
    assert again["pneumothorax"].status == "negative"


def _all_findings():
    for o in OBSERVATIONS:
        if o == "no_finding":
            continue
        for st, lat, sev, zone, sub in itertools.product(
            ("positive", "uncertain"),
            (None, *LATERALITIES),
            (None, *SEVERITIES),
            (None, *ZONES),
            (None, *SUBTYPES.get(o, ())),
        ):
            yield Finding(o, st, lat, sev, zone, sub)


def test_every_template_sentence_labels_back():
    """The labeler reads every sentence the normalizer can write as the finding's status."""
    for f in _all_findings():
        got = label_report(finding_sentence(f))
        assert got[f.observation].status == f.status, finding_sentence(f)
        assert set(got) <= {f.observation, "no_finding"}, finding_sentence(f)


@pytest.mark.parametrize("obs", sorted(NEGATIVE_SENTENCES))
def test_negative_sentences_label_negative(obs):
    assert label_report(NEGATIVE_SENTENCES[obs])[obs].status == "negative"


def test_real_archive_sample(iu_archive):
    from echocxr.data.labeler_validate import read_iu_archive

    for rep in read_iu_archive(iu_archive)[:300]:
        out = normalize_report(rep.findings, rep.impression)
        text = out["findings"] + out["impression"]
        assert "xxxx" not in text.lower()
        assert bool(out["findings"]) == bool(out["impression"])


def test_docs_example():
    """The before/after example of docs/LABELER.md."""
    out = normalize_report(
        "Stable mild cardiomegaly. There are no XXXX of a pleural effusion. Low lung volumes, "
        "otherwise clear. Old healed right rib fractures. Cholecystectomy clips.",
        "No acute disease.",
    )
    assert out == {
        "findings": "Mild cardiomegaly. Healed right rib fracture. Low lung volumes. Surgical clips in the "
        "upper abdomen. No pulmonary edema. No focal consolidation. No pneumothorax. No pleural "
        "effusion. No acute fracture.",
        "impression": "Mild cardiomegaly. Healed right rib fracture.",
    }


def test_unreadable_report_gives_empty_target():
    assert normalize_report("", "") == {"findings": "", "impression": ""}
    assert normalize_report("See prior report.", "XXXX.") == {"findings": "", "impression": ""}
