"""CheXpert-Plus reader: `df_chexpert_plus_*.csv`, one row per image with the report's sections.

Columns used (as released, e.g. `df_chexpert_plus_240401.csv`): `path_to_image`
(`train/patient00001/study1/view1_frontal.jpg`), `frontal_lateral`, `ap_pa`, `deid_patient_id`,
`report`, `section_findings`, `section_impression`, `split` (`train` / `valid`). Rows of one study
(same `patientNNN/studyN` folder) are merged; the report sections come from the first row.
Images are looked up under `image_roots` and then the CSV's folder; absent images are counted,
not errors. There is no official test split: `echocxr.data.splits` carves one out of `train`.
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Iterator
from pathlib import Path

from echocxr.data.readers import IssueLog, clean_text, csv_rows, image_ref, normalize_view, require_path
from echocxr.data.records import Record
from echocxr.errors import UserError

SOURCE = "chexpert"
REQUIRED = ("path_to_image", "section_findings", "section_impression")
_OFFICIAL_SPLIT = {"train": "train", "valid": "val", "validate": "val", "val": "val", "test": "test"}


def raise_csv_field_limit() -> None:
    """Report cells can exceed csv's default 128 KiB field limit; lift it for this process."""
    limit = sys.maxsize
    while True:
        try:
            csv.field_size_limit(limit)
            return
        except OverflowError:
            limit //= 10


def study_key(path_to_image: str) -> str | None:
    """`train/patient00001/study1/view1_frontal.jpg` -> `patient00001/study1`."""
    parts = [p for p in path_to_image.replace("\\", "/").split("/") if p]
    for i, p in enumerate(parts[:-1]):
        if p.startswith("patient") and i + 1 < len(parts) and parts[i + 1].startswith("study"):
            return f"{p}/{parts[i + 1]}"
    return None


def _view(row: dict) -> str | None:
    ap_pa = normalize_view(row.get("ap_pa"))
    fl = clean_text(row.get("frontal_lateral")).lower()
    if fl == "lateral":
        return "LATERAL"
    if ap_pa in ("AP", "PA"):
        return ap_pa
    return "frontal" if fl == "frontal" else ap_pa


def _resolve_image(rel: str, roots: list[Path]) -> Path:
    for root in roots:
        p = root / rel
        if p.is_file():
            return p
    return roots[0] / rel


def read_chexpert(
    path: str | Path, log: IssueLog, image_roots: list[Path] | None = None, check_images: bool = True
) -> Iterator[Record]:
    """Studies of CheXpert-Plus, grouped from the per-image CSV."""
    csv_path = require_path(path, "CheXpert-Plus CSV")
    if csv_path.is_dir():
        found = sorted(csv_path.glob("df_chexpert_plus*.csv"))
        if not found:
            raise UserError(f"{csv_path}: no df_chexpert_plus_*.csv in this folder")
        csv_path = found[-1]  # the newest release by its date suffix
    roots = [*(image_roots or []), csv_path.parent]
    raise_csv_field_limit()

    studies: dict[str, dict] = {}
    with csv_path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, strict=True)
        missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise UserError(f"{csv_path}: not a CheXpert-Plus table (missing columns {missing})")
        for where, row in csv_rows(reader, csv_path, log, SOURCE):
            rel = clean_text(row["path_to_image"])
            key = study_key(rel)
            if key is None:
                log.add(SOURCE, where, "bad_image_path", rel[:120])
                continue
            st = studies.get(key)
            if st is None:
                st = studies[key] = {"row": row, "where": where, "images": []}
            st["images"].append((rel, _view(row)))

    for key, st in studies.items():
        row = st["row"]
        images = []
        for rel, view in sorted(st["images"]):
            ref = image_ref(_resolve_image(rel, roots), view, SOURCE, log, check_images)
            if ref is not None:
                images.append(ref)
        fnd = clean_text(row.get("section_findings"))
        imp = clean_text(row.get("section_impression"))
        study_id = f"{SOURCE}:{key}"
        yield Record(
            record_id=study_id,
            study_id=study_id,
            source=SOURCE,
            images=images,
            findings=fnd,
            impression=imp,
            original={"findings": fnd, "impression": imp, "text": (row.get("report") or "").strip()},
            meta={
                "file": st["where"],
                "patient_id": clean_text(row.get("deid_patient_id")) or key.split("/")[0],
                "official_split": _OFFICIAL_SPLIT.get(clean_text(row.get("split")).lower()),
                "exam": clean_text(row.get("section_narrative")),
                "indication": clean_text(row.get("section_clinical_history")),
                "views": [v for _, v in sorted(st["images"])],
            },
        )
