"""MIMIC-CXR reader: the free-text report tree plus the MIMIC-CXR-JPG metadata and split tables.

Layout (PhysioNet, one folder holding both downloads):

    DIR/files/p10/p10000032/s50414267.txt          report of study 50414267 (mimic-cxr-reports)
    DIR/files/p10/p10000032/s50414267/<dicom>.jpg  its images (mimic-cxr-jpg; optional here)
    DIR/mimic-cxr-2.0.0-metadata.csv[.gz]          dicom_id, subject_id, study_id, ViewPosition, ...
    DIR/mimic-cxr-2.0.0-split.csv[.gz]             dicom_id, study_id, subject_id, split

`DIR/mimic-cxr-reports/files/...` is accepted as well. Reports are free text; FINDINGS and
IMPRESSION are cut out at their capitalised headings (`parse_sections`).
"""

from __future__ import annotations

import csv
import gzip
import io
import re
from collections.abc import Iterator
from pathlib import Path

from echocxr.data.readers import IssueLog, clean_text, image_ref, normalize_view, require_path
from echocxr.data.records import Record

SOURCE = "mimic"

# A heading is a capitalised phrase at the start of a line followed by a colon ("FINDINGS:",
# "PA AND LATERAL VIEWS OF THE CHEST:"). Lower-case text with colons ("Dr. ___ at 10:30") is body.
_HEADING = re.compile(r"^[ \t]*([A-Z][A-Z /&()'\-]{1,60}?)[ \t]*:", re.MULTILINE)
_FINDINGS = {"FINDINGS", "FINDING", "FINDINGS AND IMPRESSION", "FINDINGS/IMPRESSION"}
_IMPRESSION = {"IMPRESSION", "IMPRESSIONS", "CONCLUSION", "CONCLUSIONS"}
_OFFICIAL_SPLIT = {"train": "train", "validate": "val", "valid": "val", "val": "val", "test": "test"}


def parse_sections(text: str) -> dict[str, str]:
    """Section heading (upper case) -> whitespace-cleaned body; repeated headings are joined."""
    out: dict[str, str] = {}
    matches = list(_HEADING.finditer(text))
    for m, nxt in zip(matches, matches[1:] + [None]):
        body = text[m.end() : nxt.start() if nxt else len(text)]
        name = clean_text(m.group(1))
        out[name] = clean_text(f"{out.get(name, '')} {body}")
    return out


def findings_impression(sections: dict[str, str]) -> tuple[str, str]:
    """FINDINGS and IMPRESSION from parsed sections (CONCLUSION counts as the impression)."""
    fnd = next((sections[h] for h in sections if h in _FINDINGS and sections[h]), "")
    imp = next((sections[h] for h in sections if h in _IMPRESSION and sections[h]), "")
    return fnd, imp


def _open_table(root: Path, stem: str) -> tuple[Path, io.TextIOBase] | None:
    for name in (f"{stem}.csv.gz", f"{stem}.csv"):
        p = root / name
        if p.is_file():
            if name.endswith(".gz"):
                return p, io.TextIOWrapper(gzip.open(p), encoding="utf-8", newline="")
            return p, p.open(encoding="utf-8", newline="")
    return None


def _read_table(root: Path, stem: str, needed: tuple[str, ...], log: IssueLog) -> list[dict]:
    opened = _open_table(root, stem)
    if opened is None:
        log.add(SOURCE, root / f"{stem}.csv[.gz]", "missing_table", "not found; going on without it")
        return []
    path, f = opened
    rows = []
    with f:
        try:
            reader = csv.DictReader(f, strict=True)
            missing = [c for c in needed if c not in (reader.fieldnames or [])]
            if missing:
                log.add(SOURCE, path, "bad_table", f"missing columns {missing}")
                return []
            for lineno, row in enumerate(reader, 2):
                if None in row or any(row.get(c) is None for c in needed):
                    log.add(SOURCE, f"{path}:{lineno}", "broken_csv_row", "wrong number of fields")
                    continue
                rows.append(row)
        except (csv.Error, OSError, EOFError, UnicodeDecodeError) as e:
            log.add(SOURCE, path, "broken_csv", str(e))
    return rows


def _report_files(root: Path) -> list[Path]:
    for base in (root / "files", root / "mimic-cxr-reports" / "files", root):
        if base.is_dir():
            found = sorted(base.glob("p*/p*/s*.txt"))
            if found:
                return found
    return []


def read_mimic(path: str | Path, log: IssueLog, check_images: bool = True) -> Iterator[Record]:
    """Studies of MIMIC-CXR with their official split and, where the JPGs are present, images."""
    root = require_path(path, "MIMIC-CXR folder")
    reports = _report_files(root)
    if not reports:
        from echocxr.errors import UserError

        raise UserError(f"{root}: no MIMIC-CXR reports (files/pXX/pXXXXXXXX/sXXXXXXXX.txt) found")

    meta_rows = _read_table(root, "mimic-cxr-2.0.0-metadata", ("dicom_id", "study_id"), log)
    split_rows = _read_table(root, "mimic-cxr-2.0.0-split", ("dicom_id", "study_id", "split"), log)
    dicoms: dict[str, list[tuple[str, str | None]]] = {}
    for row in meta_rows:
        dicoms.setdefault(row["study_id"], []).append((row["dicom_id"], row.get("ViewPosition")))
    splits = {row["study_id"]: row["split"] for row in split_rows}

    for rp in reports:
        try:
            text = rp.read_text(encoding="utf-8", errors="strict")
        except (OSError, UnicodeDecodeError) as e:
            log.add(SOURCE, rp, "unreadable_file", str(e))
            continue
        study_num = rp.stem[1:]
        patient = rp.parent.name
        sections = parse_sections(text)
        fnd, imp = findings_impression(sections)
        images = []
        study_dir = rp.with_suffix("")
        if study_dir.is_dir():
            listed = dicoms.get(study_num) or [(p.stem, None) for p in sorted(study_dir.glob("*.jpg"))]
            for dicom_id, view in sorted(listed):
                jpg = study_dir / f"{dicom_id}.jpg"
                ref = image_ref(jpg, normalize_view(view), SOURCE, log, check_images)
                if ref is not None:
                    images.append(ref)
        elif study_num in dicoms:
            log.missing_images[SOURCE] += len(dicoms[study_num])
        study_id = f"{SOURCE}:s{study_num}"
        official = _OFFICIAL_SPLIT.get(clean_text(splits.get(study_num)).lower())
        yield Record(
            record_id=study_id,
            study_id=study_id,
            source=SOURCE,
            images=images,
            findings=fnd,
            impression=imp,
            original={"findings": fnd, "impression": imp, "text": text.strip()},
            meta={
                "file": str(rp),
                "patient_id": patient,
                "official_split": official,
                "exam": sections.get("EXAMINATION", ""),
                "indication": sections.get("INDICATION", ""),
                "views": [normalize_view(v) for _, v in sorted(dicoms.get(study_num, []))],
            },
        )
