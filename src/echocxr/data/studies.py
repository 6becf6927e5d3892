"""Studies to report on, from a corpus JSONL, a CSV manifest or a folder (`echocxr generate --studies`).

- corpus JSONL (`data.records`): one study per record (its id is the record id, so a study's EN
  and ZH copies are two studies); image paths relative to the file's folder.
- CSV manifest: columns `study_id`, `path` (one image per row; rows sharing a study id form one
  study), optional `view` (PA, AP, frontal, LL, LATERAL, lateral) and `language` (en, zh).
- folder (searched recursively): DICOM files are grouped into studies by StudyInstanceUID; any
  other image file (PNG, JPEG) is a study of its own, named by its path inside the folder.

A DICOM image's view comes from its tags, in this order: ViewPosition (PA/AP frontal; LL, RL,
LATERAL lateral; any other stated value, e.g. an oblique, is "other"), PatientOrientation (row
direction L/R frontal, A/P lateral), SeriesDescription (words PA/AP/FRONTAL or LL/LAT/LATERAL).
Files that are not usable radiographs (SR documents, presentation states, other modalities,
unreadable or duplicate files) are returned as `Skip`s with the reason, never dropped.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from echocxr.errors import UserError

RADIOGRAPH_MODALITIES = ("CR", "DX", "DR", "OT")  # OT: digitized films stored as secondary capture
PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
VIEW_WORDS = {  # stated spellings (manifest, record, ViewPosition) -> view
    "pa": "frontal",
    "ap": "frontal",
    "frontal": "frontal",
    "ll": "lateral",
    "rl": "lateral",
    "lat": "lateral",
    "lateral": "lateral",
}
_DICOM_SUFFIXES = (".dcm", ".dicom")  # as `data.images`: files without the DICM preamble


@dataclass(frozen=True)
class StudyImage:
    path: str
    view: str | None  # "frontal", "lateral", "other" (stated, neither) or None (not stated)
    view_source: str  # the tag or column it came from, or "unstated"
    sop_instance_uid: str | None = None  # DICOM only
    dicom: bool = False


@dataclass(frozen=True)
class Study:
    id: str  # unique in its input: StudyInstanceUID, manifest study_id, record id, or relative path
    images: tuple[StudyImage, ...]
    language: str | None = None  # None: the command's default


@dataclass(frozen=True)
class Skip:
    path: str
    reason: str
    study_id: str | None = None


@dataclass
class Discovery:
    studies: list[Study] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def _text(ds, keyword: str) -> str:
    from pydicom.multival import MultiValue

    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, (list, tuple, MultiValue)):
        return "\\".join(str(v) for v in value).strip()
    return str(value).strip()


def dicom_view(ds) -> tuple[str | None, str]:
    """(view, the tag it came from) for a DICOM header; (None, "unstated") when no tag says."""
    vp = _text(ds, "ViewPosition").upper()
    if vp:
        return VIEW_WORDS.get(vp.lower(), "other"), "ViewPosition"
    po = _text(ds, "PatientOrientation").upper()
    if po:
        row = po.split("\\")[0][:1]
        if row in ("L", "R"):
            return "frontal", "PatientOrientation"
        if row in ("A", "P"):
            return "lateral", "PatientOrientation"
    words = set(re.split(r"[^A-Z]+", _text(ds, "SeriesDescription").upper()))
    frontal, lateral = bool(words & {"PA", "AP", "FRONTAL"}), bool(words & {"LL", "LAT", "LATERAL"})
    if frontal != lateral:
        return ("frontal" if frontal else "lateral"), "SeriesDescription"
    return None, "unstated"


def read_dicom_header(path: Path):
    """The header of a DICOM file (pixel data deferred, not read); UserError when unreadable."""
    import warnings

    import pydicom

    try:
        with warnings.catch_warnings():  # a damaged header is reported once, as a skip
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, defer_size="64 KB")
            ds.get("SOPClassUID")  # decode the first elements now: a cut header fails here
    except Exception as e:  # pydicom raises many kinds for a damaged file
        raise UserError(f"{path}: unreadable DICOM ({_one_line(e)})") from None
    if "SOPClassUID" not in ds:  # type 1 in every IOD: a header without it is cut or not DICOM
        raise UserError(f"{path}: unreadable DICOM (no SOPClassUID: truncated or not a DICOM dataset)")
    return ds


def _looks_dicom(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM" or path.suffix.lower() in _DICOM_SUFFIXES


def _dicom_image(path: Path, ds) -> tuple[str | None, StudyImage | None, str]:
    """(StudyInstanceUID, image, "") or (None, None, why it is not a usable radiograph)."""
    from pydicom.uid import UID

    sop_class = _text(ds, "SOPClassUID")
    kind = UID(sop_class).name
    modality = _text(ds, "Modality") or "none"
    if not any(t in ds for t in PIXEL_TAGS):
        return None, None, f"{kind} (modality {modality}): no pixel data, not an image"
    if modality != "none" and modality.upper() not in RADIOGRAPH_MODALITIES:
        return (
            None,
            None,
            f"{kind} (modality {modality}): not a radiograph ({', '.join(RADIOGRAPH_MODALITIES)})",
        )
    study_uid = _text(ds, "StudyInstanceUID")
    if not study_uid:
        return None, None, "no StudyInstanceUID: cannot be grouped into a study"
    view, source = dicom_view(ds)
    return study_uid, StudyImage(str(path), view, source, _text(ds, "SOPInstanceUID") or None, True), ""


def _image_at(path: Path, view: str | None, source: str) -> StudyImage:
    """A listed file: a stated view wins; a DICOM without one takes its tags' view."""
    if _looks_dicom(path):
        ds = read_dicom_header(path)
        tag_view, tag_source = dicom_view(ds)
        if view is None:
            view, source = tag_view, tag_source
        return StudyImage(str(path), view, source, _text(ds, "SOPInstanceUID") or None, True)
    return StudyImage(str(path), view, source if view else "unstated")


def _stated_view(text: str | None, where: str) -> str | None:
    if not text or not text.strip():
        return None
    view = VIEW_WORDS.get(text.strip().lower())
    if view is None:
        raise UserError(f"{where}: view {text!r} is not one of PA, AP, frontal, LL, LATERAL, lateral")
    return view


def _listed(path: Path, view: str | None, source: str, study_id: str, found: Discovery) -> StudyImage | None:
    if not path.is_file():
        found.skipped.append(Skip(str(path), "file not found", study_id))
        return None
    try:
        return _image_at(path, view, source)
    except UserError as e:
        found.skipped.append(Skip(str(path), str(e).removeprefix(f"{path}: "), study_id))
        return None


def from_corpus(path: Path) -> Discovery:
    from echocxr.data.records import read_jsonl

    found, root = Discovery(), path.resolve().parent
    for r in read_jsonl(path):
        imgs = []
        for ref in r.images:
            p = Path(ref.path).expanduser()
            view = VIEW_WORDS.get((ref.view or "").lower()) if ref.view else None
            img = _listed(p if p.is_absolute() else root / p, view, "record", r.record_id, found)
            imgs += [img] if img else []
        if imgs:
            found.studies.append(Study(r.record_id, tuple(imgs), r.language))
        elif not r.images:
            found.skipped.append(Skip(str(path), "record lists no images", r.record_id))
    return found


def from_manifest(path: Path) -> Discovery:
    found, root = Discovery(), path.resolve().parent
    groups: dict[str, list[StudyImage]] = {}
    languages: dict[str, str | None] = {}
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            missing = {"study_id", "path"} - set(reader.fieldnames or [])
            if missing:
                raise UserError(
                    f"{path}: missing column(s) {', '.join(sorted(missing))} "
                    f"(has {', '.join(reader.fieldnames or []) or 'none'}); need study_id, path"
                )
            for line, row in enumerate(reader, 2):
                where = f"{path}:{line}"
                sid, rel = (row.get("study_id") or "").strip(), (row.get("path") or "").strip()
                if not sid or not rel:
                    raise UserError(f"{where}: empty study_id or path")
                lang = (row.get("language") or "").strip() or None
                if lang not in (None, "en", "zh"):
                    raise UserError(f"{where}: language {lang!r} is not en or zh")
                if sid in languages and languages[sid] != lang:
                    raise UserError(
                        f"{where}: study {sid} has language {lang!r} here, {languages[sid]!r} before"
                    )
                languages[sid] = lang
                view = _stated_view(row.get("view"), where)
                p = Path(rel).expanduser()
                img = _listed(p if p.is_absolute() else root / p, view, "manifest", sid, found)
                groups.setdefault(sid, [])
                if img:
                    groups[sid].append(img)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{path}: unreadable CSV manifest ({_one_line(e)})") from None
    found.studies = [Study(sid, tuple(imgs), languages[sid]) for sid, imgs in groups.items() if imgs]
    return found


def from_folder(root: Path) -> Discovery:
    from PIL import Image, UnidentifiedImageError

    found = Discovery()
    dicom: dict[str, list[StudyImage]] = {}
    sop_seen: dict[str, str] = {}
    other: list[Study] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if _looks_dicom(path):
                try:
                    ds = read_dicom_header(path)
                except UserError as e:
                    found.skipped.append(Skip(str(path), str(e).removeprefix(f"{path}: ")))
                    continue
                study_uid, img, why = _dicom_image(path, ds)
                if img is None:
                    found.skipped.append(Skip(str(path), why))
                elif img.sop_instance_uid in sop_seen:
                    why = f"same SOPInstanceUID as {sop_seen[img.sop_instance_uid]}"
                    found.skipped.append(Skip(str(path), why, study_uid))
                else:
                    if img.sop_instance_uid:
                        sop_seen[img.sop_instance_uid] = str(path)
                    dicom.setdefault(study_uid, []).append(img)
                continue
            try:
                with Image.open(path):
                    pass
            except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
                found.skipped.append(Skip(str(path), f"not a DICOM or image file ({_one_line(e)})"))
                continue
            other.append(Study(path.relative_to(root).as_posix(), (StudyImage(str(path), None, "unstated"),)))
    studies = [Study(uid, tuple(imgs)) for uid, imgs in dicom.items()] + other
    found.studies = sorted(studies, key=lambda s: s.id)
    return found


def discover(spec: str | os.PathLike) -> Discovery:
    """The studies of a corpus .jsonl, a .csv manifest or a folder; UserError for anything else."""
    path = Path(spec)
    if path.is_dir():
        found = from_folder(path)
    elif not path.is_file():
        raise UserError(f"{path}: --studies not found (a corpus .jsonl, a .csv manifest or a folder)")
    elif path.suffix.lower() == ".jsonl":
        found = from_corpus(path)
    elif path.suffix.lower() == ".csv":
        found = from_manifest(path)
    else:
        raise UserError(f"{path}: --studies must be a corpus .jsonl, a .csv manifest or a folder")
    ids = [s.id for s in found.studies]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise UserError(f"{path}: study id {dup!r} appears more than once")
    return found


def select_views(study: Study, views) -> tuple[list[StudyImage], list[StudyImage]] | str:
    """(images for `views` in that order, images left unused), or why the study has none for
    some view. A stated view is matched first; unstated images fill what is left, in order."""
    used: list[int] = []
    for view in views:
        hit = next((i for i, im in enumerate(study.images) if i not in used and im.view == view), None)
        if hit is None:
            hit = next((i for i, im in enumerate(study.images) if i not in used and im.view is None), None)
        if hit is None:
            have = ", ".join(f"{im.view or 'unstated'}" for im in study.images)
            return f"no {view} image (has: {have})"
        used.append(hit)
    rest = [im for i, im in enumerate(study.images) if i not in used]
    return [study.images[i] for i in used], rest
