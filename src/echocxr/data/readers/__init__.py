"""Corpus readers: each turns one corpus in its distributed layout into `Record`s.

Readers only parse. They keep the source text as found (in `Record.original` and, for now, in
`findings`/`impression`), the official split when the corpus has one (`meta["official_split"]`),
a patient id where known (`meta["patient_id"]`, so splits never put one patient on both sides)
and the exam description (`meta["exam"]`, used by the non-chest filter). Cleaning, labelling,
normalization and splitting happen in `echocxr.data.build`.

A reader never raises on a bad item inside a corpus: a malformed XML file, a broken CSV row or
an unreadable image is written to the `IssueLog` with its file name and the build goes on. A
missing corpus path is a `UserError`.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from echocxr.data.records import ImageRef
from echocxr.errors import UserError


@dataclass(frozen=True)
class Issue:
    source: str
    file: str
    problem: str  # short category, e.g. "malformed_xml", "broken_csv_row", "unreadable_image"
    detail: str = ""


@dataclass
class IssueLog:
    """Problems met while reading, kept with file names for the data card."""

    issues: list[Issue] = field(default_factory=list)
    # Images named by the corpus but absent on disk: expected when only reports are available,
    # so they are counted, not listed as errors.
    missing_images: Counter = field(default_factory=Counter)

    def add(self, source: str, file: str | Path, problem: str, detail: str = "") -> None:
        self.issues.append(Issue(source, str(file), problem, detail))

    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, Counter] = {}
        for i in self.issues:
            out.setdefault(i.source, Counter())[i.problem] += 1
        return {s: dict(sorted(c.items())) for s, c in sorted(out.items())}


def require_path(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{p}: {what} not found")
    return p


_WS = re.compile(r"\s+")


def csv_rows(reader, path, log: IssueLog, source: str):
    """(\"file:line\", row) for every well-formed row of a csv.DictReader. A row the csv module
    rejects or one with the wrong number of fields is logged as broken_csv_row and skipped."""
    import csv

    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            log.add(source, f"{path}:{reader.line_num}", "broken_csv_row", str(e))
            continue
        where = f"{path}:{reader.line_num}"
        if None in row or any(v is None for v in row.values()):
            log.add(source, where, "broken_csv_row", "wrong number of fields")
            continue
        yield where, row


def clean_text(text: str | None) -> str:
    """Collapse whitespace; `None` and NaN-like CSV cells become empty."""
    if text is None:
        return ""
    t = _WS.sub(" ", str(text)).strip()
    return "" if t.lower() in ("nan", "none", "null") else t


def normalize_view(raw: str | None) -> str | None:
    """Map the many spellings of a projection to "PA", "AP", "LATERAL", "frontal" or None."""
    v = clean_text(raw).upper().replace("-", "_").replace(" ", "_")
    if not v:
        return None
    if v in ("PA", "POSTERO_ANTERIOR", "POSTEROANTERIOR"):
        return "PA"
    if v.startswith("AP") or v in ("ANTERO_POSTERIOR", "ANTEROPOSTERIOR"):
        return "AP"
    if v in ("LATERAL", "LL", "RL", "LAT", "LEFT_LATERAL", "RIGHT_LATERAL", "XTABLE_LATERAL"):
        return "LATERAL"
    if v == "FRONTAL":
        return "frontal"
    return None


def image_ref(
    path: Path, view: str | None, source: str, log: IssueLog, open_check: bool = True
) -> ImageRef | None:
    """An `ImageRef` for an image that exists and opens; None (and a log entry) otherwise.

    Only the header is read (PIL's lazy open): enough to catch truncated or non-image files
    without decoding hundreds of thousands of radiographs. `open_check=False` only tests that
    the file exists (for slow network storage).
    """
    if not path.is_file():
        log.missing_images[source] += 1
        return None
    if not open_check:
        return ImageRef(str(path.resolve()), view)
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.size  # noqa: B018 - forces the header parse
    except (OSError, UnidentifiedImageError, ValueError) as e:
        log.add(source, path, "unreadable_image", str(e))
        return None
    return ImageRef(str(path.resolve()), view)


def study_sort_key(study_id: str) -> tuple:
    """Natural order ("iu:CXR2" before "iu:CXR10") so outputs read in corpus order."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", study_id))
