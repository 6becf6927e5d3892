"""The clinical vocabulary shared by the labeler, the normalizer, the phantom renderer and the metrics.

An observation is one of the 14 CheXpert classes or one of the extras that IU reports state often.
A `Finding` is what is known of one observation in one study: its status and, where the text or
the MeSH code gives them, laterality, severity, zone and subtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

CHEXPERT14: tuple[str, ...] = (
    "no_finding",
    "enlarged_cardiomediastinum",
    "cardiomegaly",
    "lung_opacity",
    "lung_lesion",
    "edema",
    "consolidation",
    "pneumonia",
    "atelectasis",
    "pneumothorax",
    "pleural_effusion",
    "pleural_other",
    "fracture",
    "support_devices",
)

EXTRAS: tuple[str, ...] = (
    "calcified_granuloma",
    "hyperinflation",  # emphysema / COPD / hyperexpanded lungs
    "sternotomy",
    "hiatal_hernia",
    "scoliosis",
    "degenerative_spine",
    "aortic_abnormality",  # tortuous, ectatic or calcified aorta
)

OBSERVATIONS: tuple[str, ...] = CHEXPERT14 + EXTRAS

Status = Literal["positive", "negative", "uncertain"]
STATUSES: tuple[str, ...] = ("positive", "negative", "uncertain")
LATERALITIES: tuple[str, ...] = ("left", "right", "bilateral")
SEVERITIES: tuple[str, ...] = ("mild", "moderate", "severe")
ZONES: tuple[str, ...] = ("upper", "middle", "lower")

# Subtypes that change how a finding is drawn or phrased.
SUBTYPES: dict[str, tuple[str, ...]] = {
    "lung_lesion": ("nodule", "mass"),
    "atelectasis": ("linear", "lobar"),
    "support_devices": ("pacemaker", "central_line", "endotracheal_tube", "ng_tube", "chest_tube", "other"),
    "fracture": ("rib", "clavicle", "spine", "other"),
    "edema": ("edema", "vascular_congestion"),
    "aortic_abnormality": ("tortuous", "calcified"),
}

# Human-readable names in standard terminology, used by the normalizer and the docs.
DISPLAY: dict[str, str] = {
    "no_finding": "no acute cardiopulmonary abnormality",
    "enlarged_cardiomediastinum": "enlarged cardiomediastinal silhouette",
    "cardiomegaly": "cardiomegaly",
    "lung_opacity": "lung opacity",
    "lung_lesion": "pulmonary nodule or mass",
    "edema": "pulmonary edema",
    "consolidation": "focal consolidation",
    "pneumonia": "pneumonia",
    "atelectasis": "atelectasis",
    "pneumothorax": "pneumothorax",
    "pleural_effusion": "pleural effusion",
    "pleural_other": "pleural thickening",
    "fracture": "acute fracture",
    "support_devices": "support device",
    "calcified_granuloma": "calcified granuloma",
    "hyperinflation": "hyperinflation",
    "sternotomy": "median sternotomy",
    "hiatal_hernia": "hiatal hernia",
    "scoliosis": "scoliosis",
    "degenerative_spine": "degenerative change of the spine",
    "aortic_abnormality": "aortic tortuosity or calcification",
}


@dataclass(frozen=True)
class Finding:
    """One observation in one study."""

    observation: str
    status: str = "positive"
    laterality: str | None = None
    severity: str | None = None
    zone: str | None = None
    subtype: str | None = None

    def __post_init__(self) -> None:
        if self.observation not in OBSERVATIONS:
            raise ValueError(f"unknown observation {self.observation!r}")
        if self.status not in STATUSES:
            raise ValueError(f"unknown status {self.status!r} for {self.observation}")
        for name, value, allowed in (
            ("laterality", self.laterality, LATERALITIES),
            ("severity", self.severity, SEVERITIES),
            ("zone", self.zone, ZONES),
        ):
            if value is not None and value not in allowed:
                raise ValueError(f"unknown {name} {value!r} for {self.observation}")

    def to_dict(self) -> dict:
        # Every field is a string or None, so no deep copy (asdict) is needed.
        return {k: v for k in _FINDING_FIELDS if (v := getattr(self, k)) is not None}

    @staticmethod
    def from_dict(d: dict) -> Finding:
        return Finding(
            **{
                k: d.get(k)
                for k in ("observation", "status", "laterality", "severity", "zone", "subtype")
                if k in d
            }
        )


_FINDING_FIELDS = ("observation", "status", "laterality", "severity", "zone", "subtype")
Findings = dict[str, Finding]  # observation -> Finding


def findings_to_json(findings: Findings) -> dict[str, dict]:
    return {k: f.to_dict() for k, f in sorted(findings.items())}


def findings_from_json(d: dict[str, dict]) -> Findings:
    return {k: Finding.from_dict({"observation": k, **v}) for k, v in d.items()}


def positive(findings: Findings) -> Findings:
    return {k: f for k, f in findings.items() if f.status == "positive"}
