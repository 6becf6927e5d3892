"""ReXGradient-160K reader: the release's metadata tables of studies with Findings/Impression.

The release ships one metadata table per split (`metadata/train_metadata.csv`, `valid_...`,
`test_...`; JSON versions exist too) next to the PNG folder (`deid_png/...`). A table is either
one row per study or one row per image; both are accepted and rows are grouped by study.
Columns are matched without regard to case:

    study id   StudyInstanceUid | study_id | StudyID | id
    patient    PatientID | patient_id
    findings   Findings            impression  Impression
    images     ImagePath (one path, or a JSON / Python list of paths), relative to the dataset root
    views      ImageViewPosition (same shape as ImagePath)
    split      split, or else the table's file name (train / valid / test)

PATH may be the dataset folder, its `metadata/` folder or a single table. The dataset root (for
image paths) is the folder above `metadata/` when the tables sit there, else the tables' folder.
"""

from __future__ import annotations

import ast
import csv
import json
from collections.abc import Iterator
from pathlib import Path

from echocxr.data.readers import IssueLog, clean_text, csv_rows, image_ref, normalize_view, require_path
from echocxr.data.readers.chexpert import raise_csv_field_limit
from echocxr.data.records import Record
from echocxr.errors import UserError

SOURCE = "rexgradient"
_COLUMNS = {
    "study": ("studyinstanceuid", "study_id", "studyid", "id"),
    "patient": ("patientid", "patient_id"),
    "findings": ("findings",),
    "impression": ("impression",),
    "images": ("imagepath", "image_path", "imagepaths"),
    "views": ("imageviewposition", "viewposition", "view"),
    "split": ("split",),
    "indication": ("indication",),
    "comparison": ("comparison",),
}
_SPLIT_WORDS = (("train", "train"), ("valid", "val"), ("val", "val"), ("test", "test"))


def _field(row: dict, name: str):
    lower = {k.lower(): v for k, v in row.items() if isinstance(k, str)}
    for alias in _COLUMNS[name]:
        if alias in lower and lower[alias] not in (None, ""):
            return lower[alias]
    return None


def _as_list(value) -> list[str]:
    """A cell holding one path, a JSON list or a Python-literal list -> list of strings."""
    if value is None:
        return []
    if isinstance(value, list):
        return [str(v) for v in value]
    s = str(value).strip()
    if s.startswith("["):
        for parse in (json.loads, ast.literal_eval):
            try:
                got = parse(s)
            except (ValueError, SyntaxError):
                continue
            if isinstance(got, list):
                return [str(v) for v in got]
    return [s] if s else []


def _split_from_name(name: str) -> str | None:
    low = name.lower()
    return next((s for word, s in _SPLIT_WORDS if word in low), None)


def _tables(path: Path) -> tuple[list[Path], Path]:
    if path.is_file():
        root = path.parent.parent if path.parent.name == "metadata" else path.parent
        return [path], root
    folder = path / "metadata" if (path / "metadata").is_dir() else path
    tables = sorted(
        p for ext in ("csv", "json", "jsonl") for p in folder.glob(f"*.{ext}") if "metadata" in p.name.lower()
    )
    if not tables:
        raise UserError(f"{path}: no ReXGradient metadata table (*metadata*.csv/json/jsonl) found")
    root = folder.parent if folder.name == "metadata" else folder
    return tables, root


def _rows(table: Path, log: IssueLog) -> Iterator[tuple[str, dict]]:
    """(location, row) pairs of one table; bad rows and unreadable files go to the log."""
    try:
        if table.suffix == ".csv":
            raise_csv_field_limit()
            with table.open(encoding="utf-8", newline="") as f:
                reader = csv.DictReader(f, strict=True)
                header = {c.strip().lower() for c in (reader.fieldnames or [])}
                missing = [
                    _COLUMNS[k][0] for k in ("findings", "impression") if not header & set(_COLUMNS[k])
                ]
                if missing:
                    # A renamed column would silently read every study as empty: refuse the table.
                    raise UserError(f"{table}: not a ReXGradient metadata table (missing columns {missing})")
                yield from csv_rows(reader, table, log, SOURCE)
        elif table.suffix == ".jsonl":
            with table.open(encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        log.add(SOURCE, f"{table}:{lineno}", "broken_json_row", str(e))
                        continue
                    if isinstance(row, dict):
                        yield f"{table}:{lineno}", row
                    else:
                        log.add(SOURCE, f"{table}:{lineno}", "broken_json_row", "not an object")
        else:
            data = json.loads(table.read_text(encoding="utf-8"))
            # Either {study_id: {...}} or [{...}, ...].
            items = data.items() if isinstance(data, dict) else enumerate(data)
            for key, row in items:
                if not isinstance(row, dict):
                    log.add(SOURCE, f"{table}[{key}]", "broken_json_row", "not an object")
                    continue
                if isinstance(key, str) and _field(row, "study") is None:
                    row = {"StudyInstanceUid": key, **row}
                yield f"{table}[{key}]", row
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        log.add(SOURCE, table, "unreadable_table", str(e))


def read_rexgradient(path: str | Path, log: IssueLog, check_images: bool = True) -> Iterator[Record]:
    """Studies of ReXGradient-160K with their official split."""
    tables, root = _tables(require_path(path, "ReXGradient metadata"))
    studies: dict[str, dict] = {}
    for table in tables:
        table_split = _split_from_name(table.stem)
        for where, row in _rows(table, log):
            sid = clean_text(_field(row, "study"))
            if not sid:
                log.add(SOURCE, where, "missing_study_id", "no StudyInstanceUid/id")
                continue
            st = studies.get(sid)
            if st is None:
                split = clean_text(_field(row, "split")).lower() or table_split
                st = studies[sid] = {"row": row, "where": where, "images": [], "split": split}
            paths, views = _as_list(_field(row, "images")), _as_list(_field(row, "views"))
            for i, rel in enumerate(paths):
                st["images"].append((rel, normalize_view(views[i]) if i < len(views) else None))

    for sid, st in studies.items():
        row = st["row"]
        images = []
        for rel, view in sorted(set(st["images"]), key=lambda t: t[0]):
            ref = image_ref(root / rel, view, SOURCE, log, check_images)
            if ref is not None:
                images.append(ref)
        fnd = clean_text(_field(row, "findings"))
        imp = clean_text(_field(row, "impression"))
        ind = clean_text(_field(row, "indication"))
        cmp_ = clean_text(_field(row, "comparison"))
        text = "\n".join(
            f"{k}: {v}"
            for k, v in (("INDICATION", ind), ("COMPARISON", cmp_), ("FINDINGS", fnd), ("IMPRESSION", imp))
            if v
        )
        split = st["split"]
        official = next((s for word, s in _SPLIT_WORDS if split and split.startswith(word)), None)
        study_id = f"{SOURCE}:{sid}"
        yield Record(
            record_id=study_id,
            study_id=study_id,
            source=SOURCE,
            images=images,
            findings=fnd,
            impression=imp,
            original={"findings": fnd, "impression": imp, "text": text},
            meta={
                "file": st["where"],
                "patient_id": clean_text(_field(row, "patient")) or None,
                "official_split": official,
                "exam": "",
                "indication": ind,
                "views": [v for _, v in sorted(set(st["images"]), key=lambda t: t[0])],
            },
        )
