"""The rule-based labeler: negation, uncertainty, attributes, and agreement with IU MeSH codes."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from echocxr.data.labeler import label_report
from echocxr.data.labeler_validate import has_codes, read_iu_archive, score, validate
from echocxr.errors import UserError


def status(text: str) -> dict[str, str]:
    return {o: f.status for o, f in label_report(text).items()}


@pytest.mark.parametrize(
    ("text", "obs", "want"),
    [
        ("No pneumothorax.", "pneumothorax", "negative"),
        ("Cannot exclude a small left effusion.", "pleural_effusion", "uncertain"),
        ("Lungs are clear without focal consolidation.", "consolidation", "negative"),
        ("No evidence of pneumothorax.", "pneumothorax", "negative"),
        ("Negative for pleural effusion.", "pleural_effusion", "negative"),
        ("The previously seen left effusion has resolved.", "pleural_effusion", "negative"),
        ("Opacity may represent atelectasis.", "atelectasis", "uncertain"),
        ("Possible right lower lobe pneumonia.", "pneumonia", "uncertain"),
        ("Atelectasis versus pneumonia at the left base.", "pneumonia", "uncertain"),
        ("Atelectasis versus pneumonia at the left base.", "atelectasis", "uncertain"),
        ("There are no XXXX of a pleural effusion.", "pleural_effusion", "negative"),
        ("Mild cardiomegaly.", "cardiomegaly", "positive"),
        ("Heart size is normal.", "cardiomegaly", "negative"),
        ("No pneumothorax, but there is a small right pleural effusion.", "pleural_effusion", "positive"),
        ("No pneumothorax, but there is a small right pleural effusion.", "pneumothorax", "negative"),
        ("No focal consolidation, mild cardiomegaly.", "cardiomegaly", "positive"),
        ("Calcified granuloma in the right upper lobe.", "calcified_granuloma", "positive"),
        ("Degenerative changes of the thoracic spine.", "degenerative_spine", "positive"),
        ("Degenerative changes of the left shoulder.", "degenerative_spine", None),
        ("Tortuous calcified thoracic aorta.", "aortic_abnormality", "positive"),
        ("Left-sided pacemaker in place.", "support_devices", "positive"),
        ("No change in mild cardiomegaly.", "cardiomegaly", "positive"),
    ],
)
def test_status(text, obs, want):
    assert status(text).get(obs) == want


def test_list_negation_covers_every_item():
    got = status("No focal consolidation, pleural effusion or pneumothorax.")
    assert got["consolidation"] == got["pleural_effusion"] == got["pneumothorax"] == "negative"


def test_positive_wins_over_negative_mention():
    assert (
        status("No new effusion. Small left pleural effusion is unchanged.")["pleural_effusion"] == "positive"
    )


def test_attributes():
    f = label_report("Small left pleural effusion.")["pleural_effusion"]
    assert (f.laterality, f.severity) == ("left", "mild")
    f = label_report("Moderate bibasilar atelectasis.")["atelectasis"]
    assert (f.laterality, f.severity, f.zone) == ("bilateral", "moderate", "lower")
    f = label_report("Healed right rib fractures.")["fracture"]
    assert (f.laterality, f.subtype) == ("right", "rib")
    f = label_report("Calcified nodule in the left upper lobe.")["calcified_granuloma"]
    assert (f.laterality, f.zone) == ("left", "upper")
    assert label_report("Large hiatal hernia.")["hiatal_hernia"].severity == "severe"
    assert label_report("Dual lead pacemaker.")["support_devices"].subtype == "pacemaker"


def test_no_finding_rule():
    assert status("No acute cardiopulmonary abnormality.")["no_finding"] == "positive"
    assert status("No pneumothorax or effusion.")["no_finding"] == "positive"
    assert "no_finding" not in status("Mild cardiomegaly. No effusion.")
    assert "no_finding" not in status("Possible pneumonia.")
    # Support devices alone do not make a study abnormal (CheXpert rule).
    assert status("Pacemaker in place. Lungs are clear.")["no_finding"] == "positive"
    assert label_report("") == {}


def _tgz(tmp_path, reports: dict[str, tuple[str, str, list[str]]]):
    path = tmp_path / "mini.tgz"
    with tarfile.open(path, "w:gz") as tar:
        for n, (fnd, imp, mesh) in reports.items():
            majors = "".join(f"<major>{m}</major>" for m in mesh)
            xml = (
                f'<eCitation><uId id="CXR{n}"/><Abstract>'
                f'<AbstractText Label="FINDINGS">{fnd}</AbstractText>'
                f'<AbstractText Label="IMPRESSION">{imp}</AbstractText></Abstract>'
                f"<MeSH>{majors}</MeSH></eCitation>"
            ).encode()
            info = tarfile.TarInfo(f"ecgen-radiology/{n}.xml")
            info.size = len(xml)
            tar.addfile(info, io.BytesIO(xml))
    return path


def test_validate_command_on_small_archive(tmp_path, capsys):
    from echocxr.cli import main

    path = _tgz(
        tmp_path,
        {
            "10": ("Mild cardiomegaly. No effusion.", "Cardiomegaly.", ["Cardiomegaly/mild"]),
            "11": ("Lungs are clear.", "Normal chest.", ["normal"]),
            "12": ("Small right pleural effusion.", "Effusion.", ["Cardiomegaly"]),
        },
    )
    out = tmp_path / "res.json"
    assert main(["data", "validate-labeler", "--iu", str(path), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    card = res["all"]["per_observation"]["cardiomegaly"]
    assert (card["support"], card["precision"], card["recall"]) == (2, 1.0, 0.5)
    eff = res["all"]["per_observation"]["pleural_effusion"]
    assert (eff["support"], eff["precision"]) == (0, 0.0)
    # CXR12 hashes into the held-out part, CXR10 and CXR11 into dev.
    assert res["heldout"]["studies"] == 1 and res["dev"]["studies"] == 2
    assert "macro-F1" in capsys.readouterr().out
    assert main(["data", "validate-labeler", "--iu", str(path), "--out", str(out), "--split", "heldout"]) == 0
    assert set(json.loads(out.read_text())) == {"min_support", "held_out_rule", "heldout"}


def test_heldout_part_is_a_fixed_hash_split():
    from echocxr.data.labeler_validate import heldout_part

    assert [i for i in range(1, 13) if heldout_part(f"CXR{i}")] == [2, 3, 5, 7, 12]
    share = sum(heldout_part(f"CXR{i}") for i in range(1, 4001)) / 4000
    assert 0.17 < share < 0.23


def test_reader_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_iu_archive(tmp_path / "missing.tgz")
    bad = tmp_path / "bad.tgz"
    bad.write_bytes(b"not a tar")
    with pytest.raises(UserError, match="bad.tgz"):
        read_iu_archive(bad)


def test_macro_f1_on_real_archive(iu_archive):
    reports = read_iu_archive(iu_archive)
    res = validate(reports)
    assert len(reports) > res["all"]["studies"] > 3000  # unindexed studies are not scored
    # Issue 14 target: >= 0.88 on the archive. Measured 2026-11-30 with the second-round rules
    # (docs/LABELER.md section 2): all 0.909, dev 0.915, held-out 0.873 (the 20% never read while
    # writing rules; below the 0.88 target, see the docs). Floors: measured less a small margin.
    # Issue 22 (2026-12-02) made alternatives ("atelectasis/airspace disease", "scarring or
    # atelectasis") and "not well seen" uncertain, as CheXpert's rules have it, where the IU coders
    # code every alternative present: all 0.901, dev 0.906, held-out 0.871 after it.
    assert res["all"]["macro_f1"] >= 0.895
    assert res["dev"]["macro_f1"] >= 0.90
    assert res["heldout"]["macro_f1"] >= 0.865
    assert score(reports[:50])["studies"] == sum(has_codes(r) for r in reports[:50])
