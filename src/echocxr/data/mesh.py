"""IU X-ray (Open-i) MeSH `major` codes -> structured findings.

The IU archive's MeSH terms were coded by people from each report, e.g.
`Opacity/lung/base/left/patchy` or `Cardiomegaly/mild`. They are the ground truth for validating
the labeler and the findings the phantom renderer draws. Terms that name nothing drawable or no
observation of our vocabulary (`Technical Quality of Image Unsatisfactory`, `Cicatrix`, surgical
clips, ...) are returned as unmapped so callers can count them.
"""

from __future__ import annotations

from echocxr.data.observations import Finding, Findings

# head term (lower case) -> (observation, subtype)
_HEADS: dict[str, tuple[str, str | None]] = {
    "normal": ("no_finding", None),
    "cardiomegaly": ("cardiomegaly", None),
    "pleural effusion": ("pleural_effusion", None),
    "pneumothorax": ("pneumothorax", None),
    "opacity": ("lung_opacity", None),
    "airspace disease": ("consolidation", None),
    "consolidation": ("consolidation", None),
    "infiltrate": ("consolidation", None),
    "pneumonia": ("pneumonia", None),
    "pulmonary atelectasis": ("atelectasis", None),
    "pulmonary edema": ("edema", "edema"),
    "pulmonary congestion": ("edema", "vascular_congestion"),
    "nodule": ("lung_lesion", "nodule"),
    "mass": ("lung_lesion", "mass"),
    "calcified granuloma": ("calcified_granuloma", None),
    "granuloma": ("calcified_granuloma", None),
    "granulomatous disease": ("calcified_granuloma", None),
    "emphysema": ("hyperinflation", None),
    "pulmonary emphysema": ("hyperinflation", None),
    "pulmonary disease, chronic obstructive": ("hyperinflation", None),
    "lung, hyperlucent": ("hyperinflation", None),
    "hernia, hiatal": ("hiatal_hernia", None),
    "scoliosis": ("scoliosis", None),
    "osteophyte": ("degenerative_spine", None),
    "spondylosis": ("degenerative_spine", None),
    "fractures, bone": ("fracture", None),
    "catheters, indwelling": ("support_devices", "central_line"),
    "implanted medical device": ("support_devices", "pacemaker"),
    "tube, inserted": ("support_devices", "other"),
    "thickening": ("pleural_other", None),
}

_LATERALITY = {"left": "left", "right": "right", "bilateral": "bilateral"}
_SEVERITY = {
    "mild": "mild",
    "small": "mild",
    "borderline": "mild",
    "moderate": "moderate",
    "severe": "severe",
    "large": "severe",
}
_ZONE = {
    "base": "lower",
    "lower lobe": "lower",
    "costophrenic angle": "lower",
    "retrocardiac": "lower",
    "upper lobe": "upper",
    "apex": "upper",
    "middle lobe": "middle",
    "lingula": "middle",
    "hilum": "middle",
}
_FRACTURE_SITE = {"ribs": "rib", "clavicle": "clavicle", "thoracic vertebrae": "spine", "spine": "spine"}


def _head_and_mods(term: str) -> tuple[str, list[str]]:
    parts = [p.strip().lower() for p in term.split("/")]
    return parts[0], parts[1:]


def _observation(head: str, mods: list[str]) -> tuple[str, str | None] | None:
    if head in _HEADS:
        return _HEADS[head]
    # Heads whose meaning depends on the modifiers.
    if (
        head in ("thoracic vertebrae", "spine", "lumbar vertebrae", "cervical vertebrae")
        and "degenerative" in mods
    ):
        return "degenerative_spine", None
    if head in ("aorta", "aorta, thoracic") and ({"tortuous", "enlarged"} & set(mods)):
        return "aortic_abnormality", "tortuous"
    if head in ("atherosclerosis", "calcinosis") and ({"aorta", "aorta, thoracic"} & set(mods)):
        return "aortic_abnormality", "calcified"
    if head == "calcinosis" and ({"lung", "lymph nodes", "hilum"} & set(mods)):
        return "calcified_granuloma", None
    if head == "lung" and "hyperdistention" in mods:
        return "hyperinflation", None
    if head == "diaphragm" and "flattened" in mods:
        return "hyperinflation", None
    if head == "cardiac shadow" and "enlarged" in mods:
        return "cardiomegaly", None
    if head == "mediastinum" and "enlarged" in mods:
        return "enlarged_cardiomediastinum", None
    if head == "costophrenic angle" and "blunted" in mods:
        return "pleural_effusion", None
    return None


def _merge(a: Finding, b: Finding) -> Finding:
    """Two codes for one observation: widen laterality, keep the stronger severity."""
    lat = a.laterality or b.laterality
    if a.laterality and b.laterality and a.laterality != b.laterality:
        lat = "bilateral"
    order = (None, "mild", "moderate", "severe")
    sev = max(a.severity, b.severity, key=order.index)
    return Finding(a.observation, "positive", lat, sev, a.zone or b.zone, a.subtype or b.subtype)


def mesh_to_findings(terms: list[str]) -> tuple[Findings, list[str]]:
    """Map MeSH `major` terms to positive findings. Returns (findings, unmapped terms)."""
    findings: Findings = {}
    unmapped: list[str] = []
    for term in terms:
        head, mods = _head_and_mods(term)
        hit = _observation(head, mods)
        if hit is None:
            unmapped.append(term)
            continue
        obs, subtype = hit
        lat = next((_LATERALITY[m] for m in mods if m in _LATERALITY), None)
        sev = next((_SEVERITY[m] for m in mods if m in _SEVERITY), None)
        zone = next((_ZONE[m] for m in mods if m in _ZONE), None)
        if obs == "fracture":
            subtype = next((_FRACTURE_SITE[m] for m in mods if m in _FRACTURE_SITE), "other")
        if obs == "atelectasis":
            subtype = "linear" if {"streaky", "linear"} & set(mods) else None
        f = Finding(obs, "positive", lat, sev, zone, subtype)
        findings[obs] = _merge(findings[obs], f) if obs in findings else f
    if len(findings) > 1:
        findings.pop("no_finding", None)  # "normal" beside a real finding is a coding artefact
    return findings, unmapped
