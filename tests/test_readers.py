"""Corpus readers on the real IU archive and on small fixtures in each corpus's documented layout."""

from __future__ import annotations

import csv
import gzip
import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from echocxr.data.readers import IssueLog, normalize_view
from echocxr.data.readers.chexpert import read_chexpert, study_key
from echocxr.data.readers.iu import iu_view, read_iu
from echocxr.data.readers.mimic import findings_impression, parse_sections, read_mimic
from echocxr.data.readers.rexgradient import read_rexgradient
from echocxr.errors import UserError

IU_XML = """<?xml version="1.0" encoding="utf-8"?>
<eCitation>
  <uId id="CXR{n}"/>
  <MedlineCitation><Article><Abstract>
    <AbstractText Label="COMPARISON">None.</AbstractText>
    <AbstractText Label="INDICATION">Cough</AbstractText>
    <AbstractText Label="FINDINGS">{findings}</AbstractText>
    <AbstractText Label="IMPRESSION">{impression}</AbstractText>
  </Abstract></Article></MedlineCitation>
  <MeSH><major>Cardiomegaly/mild</major><major>Pleural Effusion/right</major></MeSH>
  <parentImage id="CXR{n}_IM-0001-1001"><caption>Xray Chest PA and Lateral</caption></parentImage>
  <parentImage id="CXR{n}_IM-0001-2001"><caption>Xray Chest PA and Lateral</caption></parentImage>
</eCitation>
"""


def _iu_tgz(path: Path, files: dict[str, str]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"ecgen-radiology/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (8, 8), 128).save(path, format="PNG")
    return path


def test_iu_real_archive(iu_archive, iu_images):
    log = IssueLog()
    recs = {r.study_id: r for r in read_iu(iu_archive, iu_images, log)}
    assert len(recs) == 3555 and log.issues == []
    r = recs["iu:CXR1"]
    assert r.source == "iu" and r.record_id == "iu:CXR1" and r.mesh == ["normal"]
    assert r.findings.startswith("The cardiac silhouette and mediastinum size are within normal limits")
    assert r.impression == "Normal chest x-XXXX."
    assert r.original["findings"] == r.findings and "INDICATION: Positive TB test" in r.original["text"]
    assert r.meta["image_ids"] == ["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001"]
    assert r.images == []  # its PNGs are not among the four available
    # The two studies whose PNGs exist get them, with the heuristic views.
    assert [(Path(i.path).name, i.view) for i in recs["iu:CXR1900"].images] == [
        ("CXR1900_IM-0584-1001.png", "frontal"),
        ("CXR1900_IM-0584-2001.png", "lateral"),
    ]
    assert len(recs["iu:CXR7"].images) == 2
    assert sum(log.missing_images.values()) > 6000


def test_iu_views_are_a_heuristic_on_the_id():
    assert iu_view("CXR7_IM-2263-1001") == "frontal"
    assert iu_view("CXR7_IM-2263-2001") == "lateral"
    assert iu_view("CXR1_1_IM-0001-3001") is None
    assert iu_view("CXR1_1_IM-0001") is None


def test_iu_malformed_xml_in_tgz_is_logged_not_fatal(tmp_path):
    tgz = _iu_tgz(
        tmp_path / "r.tgz",
        {
            "1.xml": IU_XML.format(n=1, findings="Heart is enlarged.", impression="Cardiomegaly."),
            "2.xml": "<eCitation><uId id='CXR2'/><Abstract>",  # truncated
            "3.xml": "<eCitation><MeSH/></eCitation>",  # no study id
        },
    )
    log = IssueLog()
    recs = list(read_iu(tgz, None, log))
    assert [r.study_id for r in recs] == ["iu:CXR1"]
    assert recs[0].mesh == ["Cardiomegaly/mild", "Pleural Effusion/right"]
    assert recs[0].meta["views"] == ["frontal", "lateral"]
    problems = {(i.file, i.problem) for i in log.issues}
    assert problems == {
        ("r.tgz:ecgen-radiology/2.xml", "malformed_xml"),
        ("r.tgz:ecgen-radiology/3.xml", "missing_study_id"),
    }


def test_iu_folder_and_unreadable_image(tmp_path):
    (tmp_path / "xml").mkdir()
    (tmp_path / "xml" / "5.xml").write_text(IU_XML.format(n=5, findings="Clear.", impression="Normal."))
    _png(tmp_path / "img" / "CXR5_IM-0001-1001.png")
    (tmp_path / "img" / "CXR5_IM-0001-2001.png").write_bytes(b"not a png at all")
    log = IssueLog()
    (rec,) = read_iu(tmp_path / "xml", tmp_path / "img", log)
    assert [Path(i.path).name for i in rec.images] == ["CXR5_IM-0001-1001.png"]
    assert [(Path(i.file).name, i.problem) for i in log.issues] == [
        ("CXR5_IM-0001-2001.png", "unreadable_image")
    ]


def test_missing_paths_are_user_errors(tmp_path):
    log = IssueLog()
    with pytest.raises(UserError, match="not found"):
        list(read_iu(tmp_path / "nope.tgz", None, log))
    with pytest.raises(UserError, match="not a readable tar archive"):
        bad = tmp_path / "bad.tgz"
        bad.write_bytes(b"\x00" * 100)
        list(read_iu(bad, None, log))
    for reader in (read_mimic, read_chexpert, read_rexgradient):
        with pytest.raises(UserError, match="not found"):
            list(reader(tmp_path / "missing", log))


MIMIC_REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with cough.  Eval for pneumonia.

 COMPARISON:  ___

 FINDINGS:

 There is no focal consolidation, pleural effusion or pneumothorax.  Bilateral
 nodular opacities that most likely represent nipple shadows.  The heart is normal
 in size.

 IMPRESSION:

 No acute cardiopulmonary process.
"""


def test_mimic_sections():
    sec = parse_sections(MIMIC_REPORT)
    assert sec["EXAMINATION"] == "CHEST (PA AND LAT)"
    fnd, imp = findings_impression(sec)
    assert fnd.startswith("There is no focal consolidation") and fnd.endswith("normal in size.")
    assert imp == "No acute cardiopulmonary process."
    # CONCLUSION stands in for a missing IMPRESSION; a report with neither yields "".
    assert findings_impression(parse_sections("FINDINGS: Clear.\nCONCLUSION: Normal.")) == (
        "Clear.",
        "Normal.",
    )
    assert findings_impression(parse_sections("WET READ: ___ no ptx")) == ("", "")


def _gz_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with gzip.open(path, "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def test_mimic_reader(tmp_path):
    d = tmp_path / "files" / "p10" / "p10000032"
    d.mkdir(parents=True)
    (d / "s50414267.txt").write_text(MIMIC_REPORT)
    (d / "s53189527.txt").write_text("FINAL REPORT\n IMPRESSION: Small left effusion.\n")
    Image.new("L", (8, 8)).save(_png(d / "s50414267" / "a1.jpg"), format="JPEG")
    _gz_csv(
        tmp_path / "mimic-cxr-2.0.0-metadata.csv.gz",
        ["dicom_id", "subject_id", "study_id", "ViewPosition"],
        [["a1", "10000032", "50414267", "PA"], ["a2", "10000032", "50414267", "LATERAL"]],
    )
    _gz_csv(
        tmp_path / "mimic-cxr-2.0.0-split.csv.gz",
        ["dicom_id", "study_id", "subject_id", "split"],
        [["a1", "50414267", "10000032", "validate"], ["b1", "53189527", "10000032", "test"]],
    )
    log = IssueLog()
    recs = {r.study_id: r for r in read_mimic(tmp_path, log)}
    r = recs["mimic:s50414267"]
    assert r.impression == "No acute cardiopulmonary process." and "nipple shadows" in r.findings
    assert r.meta["official_split"] == "val" and r.meta["patient_id"] == "p10000032"
    assert [(Path(i.path).name, i.view) for i in r.images] == [("a1.jpg", "PA")]
    assert log.missing_images["mimic"] == 1  # a2.jpg is listed but absent
    assert recs["mimic:s53189527"].findings == "" and recs["mimic:s53189527"].meta["official_split"] == "test"
    assert "FINAL REPORT" in r.original["text"]


CHEXPERT_HEADER = [
    "path_to_image", "path_to_dcm", "frontal_lateral", "ap_pa", "deid_patient_id",
    "patient_report_date_order", "report", "section_narrative", "section_clinical_history",
    "section_history", "section_comparison", "section_technique", "section_procedure_comments",
    "section_findings", "section_impression", "section_end_of_impression", "section_summary",
    "section_accession_number", "age", "sex", "race", "ethnicity", "interpreter_needed",
    "insurance_type", "recent_bmi", "deceased", "split",
]  # fmt: skip


def _chexpert_row(path, fl, ap_pa, pid, findings, impression, split):
    row = dict.fromkeys(CHEXPERT_HEADER, "")
    row.update(
        path_to_image=path, frontal_lateral=fl, ap_pa=ap_pa, deid_patient_id=pid,
        report=f"NARRATIVE: Chest.\nFINDINGS: {findings}\nIMPRESSION: {impression}",
        section_narrative="CHEST 2 VIEWS", section_findings=findings,
        section_impression=impression, split=split,
    )  # fmt: skip
    return [row[c] for c in CHEXPERT_HEADER]


def test_chexpert_reader_groups_images_and_logs_broken_rows(tmp_path):
    p = tmp_path / "df_chexpert_plus_240401.csv"
    with p.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CHEXPERT_HEADER)
        w.writerow(_chexpert_row("train/patient00001/study1/view1_frontal.jpg", "Frontal", "PA",
                                 "p1", "Heart size normal.\nNo effusion.", "Normal chest.", "train"))  # fmt: skip
        w.writerow(_chexpert_row("train/patient00001/study1/view2_lateral.jpg", "Lateral", "LL",
                                 "p1", "Heart size normal.\nNo effusion.", "Normal chest.", "train"))  # fmt: skip
        w.writerow(["valid/patient00002/study1/view1_frontal.jpg", "too", "few"])
        w.writerow(_chexpert_row("valid/patient00003/study2/view1_frontal.jpg", "Frontal", "AP",
                                 "p3", "", "Right effusion.", "valid"))  # fmt: skip
    _png(tmp_path / "train/patient00001/study1/view1_frontal.jpg")
    log = IssueLog()
    recs = {r.study_id: r for r in read_chexpert(p, log)}
    assert set(recs) == {"chexpert:patient00001/study1", "chexpert:patient00003/study2"}
    a = recs["chexpert:patient00001/study1"]
    assert a.findings == "Heart size normal. No effusion." and a.meta["views"] == ["PA", "LATERAL"]
    assert a.meta["official_split"] == "train" and a.meta["patient_id"] == "p1"
    assert [Path(i.path).name for i in a.images] == ["view1_frontal.jpg"]
    assert recs["chexpert:patient00003/study2"].meta["official_split"] == "val"
    assert [(Path(i.file.rsplit(":", 1)[0]).name, i.problem) for i in log.issues] == [
        ("df_chexpert_plus_240401.csv", "broken_csv_row")
    ]
    assert log.issues[0].file.endswith(":12")  # physical line: quoted cells span lines
    assert study_key("train/patient00001/study1/view1_frontal.jpg") == "patient00001/study1"


def test_chexpert_rejects_other_tables(tmp_path):
    p = tmp_path / "other.csv"
    p.write_text("a,b\n1,2\n")
    with pytest.raises(UserError, match="missing columns"):
        list(read_chexpert(p, IssueLog()))


def test_rexgradient_csv_and_json_tables(tmp_path):
    meta = tmp_path / "metadata"
    meta.mkdir()
    with (meta / "train_metadata.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "PatientID", "StudyInstanceUid", "ImagePath", "ImageViewPosition",
                    "Indication", "Comparison", "Findings", "Impression"])  # fmt: skip
        w.writerow(["0", "P1", "1.2.3", '["deid_png/P1/1.2.3/a.png", "deid_png/P1/1.2.3/b.png"]',
                    '["PA", "LATERAL"]', "Cough", "None", "Lungs clear.", "No acute disease."])  # fmt: skip
        w.writerow(
            ["1", "P2", "1.2.4", "deid_png/P2/1.2.4/c.png", "AP", "", "", "Cardiomegaly.", "Enlarged heart."]
        )
        w.writerow(['2", "broken'])
    (meta / "test_metadata.json").write_text(
        json.dumps(
            {
                "9.9.9": {
                    "PatientID": "P9",
                    "Findings": "Small right effusion.",
                    "Impression": "Effusion.",
                    "ImagePath": ["deid_png/P9/x.png"],
                    "ImageViewPosition": ["PA"],
                }
            }
        )  # fmt: skip
    )
    _png(tmp_path / "deid_png/P1/1.2.3/a.png")
    log = IssueLog()
    recs = {r.study_id: r for r in read_rexgradient(tmp_path, log)}
    assert set(recs) == {"rexgradient:1.2.3", "rexgradient:1.2.4", "rexgradient:9.9.9"}
    a = recs["rexgradient:1.2.3"]
    assert a.meta["official_split"] == "train" and a.meta["patient_id"] == "P1"
    assert a.meta["views"] == ["PA", "LATERAL"] and [Path(i.path).name for i in a.images] == ["a.png"]
    assert "INDICATION: Cough" in a.original["text"]
    assert recs["rexgradient:9.9.9"].meta["official_split"] == "test"
    assert recs["rexgradient:9.9.9"].impression == "Effusion."
    assert [i.problem for i in log.issues] == ["broken_csv_row"]
    assert log.missing_images["rexgradient"] == 3


def test_normalize_view():
    assert [normalize_view(v) for v in ("PA", "postero_anterior", "AP AXIAL", "LL", "Frontal", "", None, "??")] == [
        "PA", "PA", "AP", "LATERAL", "frontal", None, None, None
    ]  # fmt: skip


def test_rexgradient_rejects_tables_without_report_columns(tmp_path):
    p = tmp_path / "train_metadata.csv"
    p.write_text("StudyInstanceUid,Report\n1.2.3,Lungs clear.\n")
    with pytest.raises(UserError, match="missing columns"):
        list(read_rexgradient(p, IssueLog()))
