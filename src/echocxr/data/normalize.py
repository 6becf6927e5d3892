"""Rule-based report normalization: original FINDINGS/IMPRESSION -> structured English target.

The normalized findings are, in this order:

1. one sentence per positive or uncertain observation of the vocabulary, written from its
   structured label (`finding_sentence`: severity, laterality, zone, subtype in standard terms);
2. the original sentences that mention no observation of the vocabulary (surgical clips, bones,
   comparisons, ...), cleaned of `XXXX` marks and, where a phrase table knows them, rewritten to one
   canonical wording (`CANONICAL`);
3. one negative sentence per observation that is negative in the text or belongs to
   `ALWAYS_NEGATED` and is not positive or uncertain ("No pneumothorax.").

The impression lists the positive/uncertain sentences of the acute observations (CheXpert classes
except support devices), or "No acute cardiopulmonary abnormality." when there are none, followed
by the chronic extras and the impression's own out-of-vocabulary sentences.

Sentences that mention an observation are replaced by the structured sentence: details beyond
status, severity, laterality, zone and subtype (sizes in cm, "stable", comparisons) are not kept.
"""

from __future__ import annotations

import re

from echocxr.data.labeler import label_report, mentions, says_normal
from echocxr.data.observations import CHEXPERT14, OBSERVATIONS, Finding, Findings

# Observations whose negative is always stated when the report does not make them positive.
ALWAYS_NEGATED: tuple[str, ...] = (
    "cardiomegaly",
    "consolidation",
    "edema",
    "pleural_effusion",
    "pneumothorax",
)
NO_ACUTE = "No acute cardiopulmonary abnormality."

NEGATIVE_SENTENCES: dict[str, str] = {
    "enlarged_cardiomediastinum": "No widening of the mediastinum.",
    "cardiomegaly": "No cardiomegaly.",
    "lung_opacity": "No focal lung opacity.",
    "lung_lesion": "No pulmonary nodule or mass.",
    "edema": "No pulmonary edema.",
    "consolidation": "No focal consolidation.",
    "pneumonia": "No pneumonia.",
    "atelectasis": "No atelectasis.",
    "pneumothorax": "No pneumothorax.",
    "pleural_effusion": "No pleural effusion.",
    "pleural_other": "No pleural thickening.",
    "fracture": "No acute fracture.",
    "support_devices": "No support devices.",
    "calcified_granuloma": "No calcified granuloma.",
    "hyperinflation": "No hyperinflation.",
    "sternotomy": "No median sternotomy.",
    "hiatal_hernia": "No hiatal hernia.",
    "scoliosis": "No scoliosis.",
    "degenerative_spine": "No degenerative changes of the spine.",
    "aortic_abnormality": "No aortic tortuosity or calcification.",
}

_SIZE = {"mild": "small", "moderate": "moderate", "severe": "large"}
_ADVERB = {"mild": "mildly", "moderate": "moderately", "severe": "severely"}
_DEVICE = {
    "pacemaker": "Cardiac pacemaker or defibrillator in place",
    "central_line": "Central venous catheter in place",
    "endotracheal_tube": "Endotracheal tube in place",
    "ng_tube": "Enteric tube in place",
    "chest_tube": "Chest tube in place",
    "other": "Medical device in place",
}
_FRACTURE = {
    "rib": "rib fracture",
    "clavicle": "clavicle fracture",
    "spine": "vertebral fracture",
    "other": "fracture",
}
_ZONE_WORD = {"upper": "upper", "middle": "mid", "lower": "lower"}

# Out-of-vocabulary sentences that are common enough to have one canonical wording (and a
# Chinese rendering in zh.py). Pattern on the cleaned, lower-cased sentence -> canonical sentence.
CANONICAL: tuple[tuple[str, str], ...] = (
    (
        r"^(?:the )?(?:visuali[sz]ed |included )?(?:osseous|bony|skeletal)(?: structures| thorax)?"
        r"(?: of the (?:thorax|chest))? (?:are |is |appear )?(?:grossly |otherwise )?(?:intact|"
        r"unremarkable|normal|within normal limits)(?: for (?:the patient'?s )?age)?$",
        "The osseous structures are intact.",
    ),
    (
        r"^no (?:acute |displaced )?(?:bony|osseous|skeletal) (?:abnormalit\w+|lesions?|findings?|"
        r"injury|process)(?: identified| seen| is seen| are seen)?$",
        "No acute osseous abnormality.",
    ),
    (r"^(?:the )?(?:trachea|airway) is (?:in the )?midline$", "The trachea is midline."),
    (
        r"^(?:the )?pulmonary vascularity is (?:within normal limits|normal)$",
        "The pulmonary vascularity is normal.",
    ),
    (r"^no (?:acute |focal )?(?:airspace disease|infiltrates?)$", "No focal consolidation."),
    (
        r"^(?:the )?(?:visuali[sz]ed )?soft tissues (?:are )?(?:unremarkable|normal)$",
        "The soft tissues are unremarkable.",
    ),
    (r"^(?:the )?(?:visuali[sz]ed )?upper abdomen is unremarkable$", "The upper abdomen is unremarkable."),
    (
        r"^(?:there is )?no (?:significant )?(?:interval )?change(?: from (?:the )?prior(?: exam\w*| study)?)?$",
        "No interval change.",
    ),
    (r"^(?:stable|unchanged) (?:exam\w*|appearance of the chest|chest|study)$", "Stable examination."),
    (
        r"^surgical clips (?:are )?(?:seen |noted |present )?in the (?:right |left )?upper abdomen$",
        "Surgical clips in the upper abdomen.",
    ),
    (
        r"^(?:there are )?(?:cholecystectomy|surgical) clips(?: are)?(?: (?:noted|seen|present))?$",
        "Surgical clips are present.",
    ),
)
_CANONICAL_RE = [(re.compile(p), s) for p, s in CANONICAL]


def _location(f: Finding) -> str:
    zone = f" {_ZONE_WORD[f.zone]}" if f.zone else ""
    if f.laterality == "bilateral":
        return f" in both{zone} lungs"
    if f.laterality:
        return f" in the {f.laterality}{zone} lung"
    return f" in the{zone} lungs" if zone else ""


def _sev(f: Finding) -> str:
    return f"{f.severity} " if f.severity else ""


def finding_sentence(f: Finding) -> str:
    """The standard English sentence for one positive or uncertain finding."""
    o, lat = f.observation, (f"{f.laterality} " if f.laterality else "")
    size = f"{_SIZE[f.severity]} " if f.severity else ""
    if o == "cardiomegaly":
        s = f"{_sev(f)}cardiomegaly"
    elif o == "enlarged_cardiomediastinum":
        s = f"{_ADVERB[f.severity] + ' ' if f.severity else ''}enlarged cardiomediastinal silhouette"
    elif o == "lung_opacity":
        s = f"{_sev(f)}lung opacity{_location(f)}"
    elif o == "lung_lesion":
        kind = {"nodule": "pulmonary nodule", "mass": "pulmonary mass"}.get(
            f.subtype or "", "pulmonary nodule or mass"
        )
        s = f"{kind}{_location(f)}"
    elif o == "edema":
        kind = "pulmonary vascular congestion" if f.subtype == "vascular_congestion" else "pulmonary edema"
        s = f"{_sev(f)}{kind}"
    elif o == "consolidation":
        s = f"{_sev(f)}consolidation{_location(f)}"
    elif o == "pneumonia":
        s = f"pneumonia{_location(f)}"
    elif o == "atelectasis":
        kind = {"linear": "linear ", "lobar": "lobar "}.get(f.subtype or "", "")
        s = f"{_sev(f)}{kind}atelectasis{_location(f)}"
    elif o == "pneumothorax":
        s = f"{size}{lat}pneumothorax"
    elif o == "pleural_effusion":
        s = f"{size}{lat}pleural effusion{'s' if f.laterality == 'bilateral' else ''}"
    elif o == "pleural_other":
        s = f"{_sev(f)}{lat}pleural thickening"
    elif o == "fracture":
        s = f"{lat}{_FRACTURE.get(f.subtype or 'other', 'fracture')}"
    elif o == "support_devices":
        s = _DEVICE.get(f.subtype or "other", _DEVICE["other"])
    elif o == "calcified_granuloma":
        s = f"calcified granuloma{_location(f)}"
    elif o == "hyperinflation":
        s = f"{_sev(f)}hyperinflation of the lungs"
    elif o == "sternotomy":
        s = "median sternotomy"
    elif o == "hiatal_hernia":
        s = f"{size}hiatal hernia"
    elif o == "scoliosis":
        s = f"{_sev(f)}scoliosis"
    elif o == "degenerative_spine":
        s = f"{_sev(f)}degenerative changes of the spine"
    elif o == "aortic_abnormality":
        s = {"tortuous": "tortuous aorta", "calcified": "aortic calcification"}.get(
            f.subtype or "", "aortic tortuosity or calcification"
        )
    else:
        raise ValueError(f"no sentence for observation {o!r}")
    if f.status == "uncertain":
        s = "possible " + s
    return s[0].upper() + s[1:] + "."


def clean_sentence(sentence: str) -> str:
    """An original sentence without `XXXX` marks, one space between words, a capital and a full stop."""
    s = re.sub(r"x-XXXX", "x-ray", sentence, flags=re.I)
    s = re.sub(r"\bno XXXX of\b", "no evidence of", s, flags=re.I)
    s = re.sub(r"X{3,}", " ", s)
    s = re.sub(r"\s+([,.;:])", r"\1", re.sub(r"\s+", " ", s)).strip(" ,;:-")
    if not s:
        return ""
    return s[0].upper() + s[1:] + ("" if s.endswith((".", "?", "!")) else ".")


def _raw_sentences(text: str) -> list[str]:
    parts = re.split(r"(?<!\d)[.;?!](?!\d)|\n", text or "")
    return [p.strip(" ,:-") for p in parts if p.strip(" ,:-")]


def out_of_vocabulary(text: str) -> list[str]:
    """The sentences of `text` that mention no observation, cleaned or canonical."""
    kept: list[str] = []
    for raw in _raw_sentences(text):
        if mentions(raw) or says_normal(raw):
            continue
        s = clean_sentence(raw)
        if len(re.findall(r"[A-Za-z]{2,}", s)) < 2:  # what is left of a de-identified fragment
            continue
        low = s.lower().rstrip(".")
        s = next((c for rx, c in _CANONICAL_RE if rx.search(low)), s)
        if s not in kept:
            kept.append(s)
    return kept


def normalize_report(findings: str, impression: str, labels: Findings | None = None) -> dict:
    """Structured English `{"findings", "impression"}` with explicit negatives (see module doc)."""
    if labels is None:
        labels = label_report(f"{findings}\n{impression}")
    shown = [labels[o] for o in OBSERVATIONS if o in labels and o != "no_finding"]
    present = [f for f in shown if f.status in ("positive", "uncertain")]
    negated = [
        o
        for o in OBSERVATIONS
        if o in NEGATIVE_SENTENCES
        and o not in {f.observation for f in present}
        and (o in ALWAYS_NEGATED or (o in labels and labels[o].status == "negative"))
    ]
    oov_f = out_of_vocabulary(findings)
    oov_i = [s for s in out_of_vocabulary(impression) if s not in oov_f]
    body = [finding_sentence(f) for f in present] + oov_f + [NEGATIVE_SENTENCES[o] for o in negated]

    acute = [
        finding_sentence(f)
        for f in present
        if f.observation in CHEXPERT14 and f.observation != "support_devices"
    ]
    chronic = [finding_sentence(f) for f in present if f.observation not in CHEXPERT14]
    impression_parts = (acute or [NO_ACUTE]) + chronic + oov_i
    return {"findings": " ".join(body), "impression": " ".join(impression_parts)}
