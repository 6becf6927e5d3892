"""The one record format every corpus reader produces, and its JSONL reading/writing.

A record is one study in one language. `findings`/`impression` hold the training target (the
normalized report); `original` keeps the source text for the normalized-vs-original ablation.
A Chinese copy shares `study_id` and has its own `record_id` (suffix `#zh`).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from echocxr.errors import UserError

SOURCES: tuple[str, ...] = ("iu", "mimic", "chexpert", "rexgradient")
SPLITS: tuple[str, ...] = ("train", "val", "test")
LANGUAGES: tuple[str, ...] = ("en", "zh")


@dataclass
class ImageRef:
    path: str  # absolute or relative to the corpus file's folder
    view: str | None = None  # "PA", "AP", "LATERAL", "frontal", "lateral" or None when unknown


@dataclass
class Record:
    record_id: str  # unique per (study, language): "iu:CXR1" or "iu:CXR1#zh"
    study_id: str  # "iu:CXR1"
    source: str
    split: str = "train"
    language: str = "en"
    images: list[ImageRef] = field(default_factory=list)
    findings: str = ""  # target text (normalized where normalization ran)
    impression: str = ""
    labels: dict[str, dict] = field(
        default_factory=dict
    )  # observation -> Finding.to_dict() (no "observation" key)
    original: dict[str, str] = field(
        default_factory=dict
    )  # {"findings", "impression", "text"} as in the source
    mesh: list[str] = field(default_factory=list)  # IU human-coded MeSH `major` terms
    meta: dict = field(default_factory=dict)  # source-specific extras (patient id, indication, ...)

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, sort_keys=True)

    @staticmethod
    def from_dict(d: dict) -> Record:
        d = dict(d)
        d["images"] = [ImageRef(**i) for i in d.get("images", [])]
        return Record(**d)

    @property
    def report(self) -> str:
        """The target report in the paper's format."""
        return format_report(self.findings, self.impression, self.language)


def format_report(findings: str, impression: str, language: str = "en") -> str:
    if language == "zh":
        return f"所见：{findings}\n印象：{impression}"
    return f"Findings: {findings}\nImpression: {impression}"


def parse_report(text: str) -> dict[str, str]:
    """Split a generated report into findings and impression (tolerant of a missing section)."""
    t = text.strip()
    for f_key, i_key in (("Findings:", "Impression:"), ("所见：", "印象：")):
        if f_key in t or i_key in t:
            head, _, imp = t.partition(i_key)
            fnd = head.replace(f_key, "", 1)
            return {"findings": fnd.strip(), "impression": imp.strip()}
    return {"findings": t, "impression": ""}


def write_jsonl(path: str | os.PathLike, records: Iterable[Record]) -> int:
    """Write records atomically (temp file then rename). Returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    n = 0
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        for r in records:
            f.write(r.to_json() + "\n")
            n += 1
    os.chmod(tmp, 0o644)  # mkstemp makes the file private; a corpus is meant to be shared
    os.replace(tmp, path)
    return n


def read_jsonl(path: str | os.PathLike) -> Iterator[Record]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: corpus file not found")
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield Record.from_dict(json.loads(line))
            except (json.JSONDecodeError, TypeError) as e:
                raise UserError(f"{path}:{lineno}: not a valid corpus record ({e})") from None


def load_corpus(
    path: str | os.PathLike, split: str | None = None, language: str | None = None
) -> list[Record]:
    return [
        r
        for r in read_jsonl(path)
        if (split is None or r.split == split) and (language is None or r.language == language)
    ]
