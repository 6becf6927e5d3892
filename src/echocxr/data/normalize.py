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

from echocxr.data.labeler import label_report, laterality, mentions, says_normal, sentences, zone
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
    "pacemaker": "cardiac pacemaker or defibrillator in place",
    "central_line": "central venous catheter in place",
    "endotracheal_tube": "endotracheal tube in place",
    "ng_tube": "enteric tube in place",
    "chest_tube": "chest tube in place",
    "other": "medical device in place",
}
_FRACTURE = {
    "rib": "rib fracture",
    "clavicle": "clavicle fracture",
    "spine": "vertebral fracture",
    "other": "fracture",
}
_ZONE_WORD = {"upper": "upper", "middle": "mid", "lower": "lower"}

# Out-of-vocabulary sentences that are common enough to have one canonical wording (and a
# Chinese rendering in zh.py). Pattern on the cleaned, lower-cased sentence (no final full stop)
# -> canonical sentence; "{side}" is filled from the pattern's `side` group.
_SIDE = r"(?P<side>left|right)"
CANONICAL: tuple[tuple[str, str], ...] = (
    (
        r"^(?:the )?(?:visuali[sz]ed |included )?(?:osseous|bony|skeletal)(?: structures| thorax| elements)?"
        r"(?: of the (?:thorax|chest))? (?:are |is |appear )?(?:grossly |otherwise )?(?:intact|"
        r"unremarkable|normal|within normal limits)(?: in appearance)?(?: for (?:the patient'?s )?age)?$",
        "The osseous structures are intact.",
    ),
    (
        r"^(?:there is )?(?:no|negative for) (?:acute |displaced )?(?:bony|bone|osseous|osseus|skeletal)"
        r"(?: or soft tissue)? (?:abnormalit\w+|lesions?|findings?|injury|process)(?: is| are)?"
        r"(?: identified| seen| demonstrated)?$|^(?:the )?visuali[sz]ed (?:osseous|bony) structures"
        r"(?: of the thorax)? are without acute abnormality$",
        "No acute osseous abnormality.",
    ),
    (r"^(?:the )?(?:trachea|airway) is (?:in the )?midline$|^midline trachea$", "The trachea is midline."),
    (
        r"^(?:the )?(?:normal )?pulmonary vascula(?:rity|ture)(?: is| appears| are)?(?: normal| within normal"
        r" limits| unremarkable)?(?: in caliber)?$",
        "The pulmonary vascularity is normal.",
    ),
    (
        r"^(?:the )?(?:visuali[sz]ed )?(?:upper )?abdomen is unremarkable$",
        "The upper abdomen is unremarkable.",
    ),
    (
        r"^(?:there is )?no (?:visible )?(?:free )?(?:intraperitoneal |subdiaphragmatic )?(?:free )?air"
        r"(?: under| beneath| below)?(?: the)?(?: hemi)?(?:diaphragms?)?$|^negative for pneumoperitoneum$",
        "No free air under the diaphragm.",
    ),
    (
        r"(?:low (?:lung )?volume|hypoinflat|hypoventilat|lung volumes (?:are |remain )?(?:\w+ )?(?:low|"
        r"decreased|reduced)).*crowding",
        "Low lung volumes with bronchovascular crowding.",
    ),
    (
        r"low (?:lung )?volume|hypoinflat|hypoventilat|lung volumes (?:are |remain )?(?:\w+ )?(?:low|"
        r"decreased|reduced)",
        "Low lung volumes.",
    ),
    (
        r"eventration (?:of )?(?:the )?"
        + _SIDE
        + r" (?:hemi)?diaphragm|"
        + _SIDE.replace("side", "side2")
        + r" (?:hemi)?diaphragm\w* eventration",
        "Eventration of the {side} hemidiaphragm.",
    ),
    (
        r"elevat\w* (?:of )?(?:the )?"
        + _SIDE
        + r" (?:hemi)?diaphragm|"
        + _SIDE.replace("side", "side2")
        + r" (?:hemi)?diaphragm\w* (?:\w+ ){0,3}elevat",
        "Elevated {side} hemidiaphragm.",
    ),
    (
        r"^(?:the )?(?:heart|cardiac silhouette|heart size)(?: size)? (?:is )?(?:at the |at )?(?:upper limits?|top)"
        r"(?: of| to)? normal(?: in size| for size)?$|^(?:the )?heart is top normal in size$",
        "The heart size is at the upper limit of normal.",
    ),
    (
        r"cholecystectomy|clips? (?:\w+ ){0,4}(?:upper abdomen|right upper quadrant)",
        "Surgical clips in the upper abdomen.",
    ),
    (r"surgical clips|\bclips\b", "Surgical clips are present."),
    (r"post-?surgical|postoperative|post-?operative|status post|surgery", "Postsurgical changes."),
    (r"foreign bod(?:y|ies)", "Radiopaque foreign body."),
    (r"nipple shadows?", "Nipple shadows."),
    (r"degenerative joint disease|arthritic|arthritis|arthropathy", "Degenerative joint disease."),
    (
        r"(?:hilar|hila) (?:contours? |fullness|prominence)|prominen\w+ (?:of )?(?:the )?(?:\w+ )?hil",
        "Prominent hila.",
    ),
    (
        r"pulmonary arter\w+ (?:are |is )?(?:enlarged|prominent)|(?:enlarged|prominent|dilat\w*|large) "
        r"(?:central )?pulmonary arter|prominence of the central pulmonary|pulmonary arter\w* hypertension|"
        r"(?:prominence|enlargement|dilation) of the pulmonary arter",
        "Prominent central pulmonary arteries.",
    ),
    (
        r"(?:chronic|interstitial) lung disease|pulmonary fibrosis|\bfibrosis|fibrotic",
        "Chronic interstitial lung disease.",
    ),
    (r"clinical(?:ly)? correlat|correlate clinically", "Clinical correlation is recommended."),
    (
        r"recommend\w*.*\bct\b|\bct\b.*recommend|\bct\b.*(?:warranted|helpful)",
        "Further evaluation with CT is recommended.",
    ),
    (r"follow-?\s?up|followup", "Follow-up imaging is recommended."),
    (r"^pectus (?:carinatum|deformity)$", "Pectus carinatum."),
    (r"^pectus excavatum(?: deformity)?$", "Pectus excavatum."),
    (
        r"^(?:diffuse |mild |generalized )?(?:osteopenia|bone demineralization|demineralization of the bones)$|"
        r"^(?:the )?(?:bones|osseous structures) are (?:diffusely )?(?:osteopenic|demineralized)$",
        "Osteopenia.",
    ),
    (
        r"^(?:there is )?vascular calcifications?(?: (?:is|are) (?:noted|seen|present))?$",
        "Vascular calcification.",
    ),
    (
        r"^arthritic changes of the skeletal structures(?: are noted)?$",
        "Arthritic changes of the skeletal structures.",
    ),
    (r"kyphos\w+|kyphotic", "Kyphosis."),
    (
        r"rib.{0,40}deformit|deformit.{0,40}\bribs?\b|rib.{0,30}(?:old|chronic|healed|posttraumatic)",
        "Old rib deformity.",
    ),
    (
        r"wedg|vertebroplasty|verterbroplasty|retropulsion|retrolisthesis|vertebra\w* .*deformit",
        "Vertebral body deformity.",
    ),
    (r"\bfusion|arthrodesis", "Postsurgical changes of the spine."),
    (
        r"valve (?:replacement|prosthesis)|prosthetic (?:\w+ )?valve|annul\w* calcif",
        "Prosthetic or calcified cardiac valve.",
    ),
    (r"implant|prosthes|arthroplasty|bone anchor", "Prosthesis."),
    (r"piercing|nipple ring|bullet", "Radiopaque foreign body."),
    (r"mastectomy|lobectomy|thoracotomy|resection|pneumonectomy|amputation", "Postsurgical changes."),
    (r"epi(?:peri)?cardial fat|pericardial fat|cardiophrenic fat", "Prominent epicardial fat."),
    (r"pericardial effusion", "Pericardial effusion."),
    (r"adenopathy", "Lymphadenopathy."),
    (r"azygo", "Azygos fissure."),
    (
        r"pneumoperitoneum|free (?:intraperitoneal )?air|subphrenic (?:\w+ )?lucency",
        "Free air under the diaphragm.",
    ),
    (
        r"bronch(?:ial|ovascular) wall thickening|peribronchial|bronchitis|bronchial thickening",
        "Bronchial wall thickening.",
    ),
    (
        r"(?:prominen\w*|increased|accentuated|engorge\w*) (?:\w+ ){0,3}(?:vascula\w*|vessels)|"
        r"vascula\w* (?:is |are |appears )?(?:\w+ )?(?:increased|prominent|accentuated)|central vascular",
        "Prominent pulmonary vasculature.",
    ),
    (
        r"interstiti|(?:increased|chronic|coarse\w*) (?:\w+ )?markings|markings (?:are )?increased",
        "Increased interstitial markings.",
    ),
    (r"degenerat|senescent|joint space narrowing|enthesop", "Degenerative changes."),
    (r"calcifi", "Scattered calcifications."),
    (r"crowding", "Bronchovascular crowding."),
    (
        r"(?:prominen\w*|widen\w*|enlarge\w*) (?:of )?(?:the )?(?:upper )?(?:mediastin|paratracheal)|"
        r"(?:mediastin\w*|paratracheal) (?:\w+ ){0,3}prominen",
        "Prominent mediastinal contour.",
    ),
)
# Findings outside the vocabulary written with their location ("Scarring in the left upper lung.").
LOCATED: tuple[tuple[str, str], ...] = (
    (r"scar", "scarring"),
    (r"volume loss", "volume loss"),
)
_LOCATED_RE = [(re.compile(p), noun) for p, noun in LOCATED]
_CANONICAL_RE = [(re.compile(p), c) for p, c in CANONICAL]
# Sentences about the examination itself, not the patient (views, comparisons, notifications),
# and reports of other body parts filed with the chest report ("Left knee."): not kept.
_META = re.compile(
    r"\bviews?\b|radiographs? (?:of the chest|were obtained)|examination (?:was obtained|consists)|"
    r"consists of|(?:were|was) obtained|\bcomparison\b|\bcompared\b|notif|primordial|dictat|"
    r"discussed|telephon|\bcalled\b|^chest(?: x-ray| radiograph)?$|^(?:pa|ap) and lateral|"
    r"^(?:left|right|bilateral) (?:knee|shoulder|hip|ankle|wrist|hand|foot|elbow|femur|tibia|humerus)s?$|"
    r"^(?:lumbosacral|lumbar|cervical) spine$|^\d+ images?$|technically|habitus|rotated|rotation|"
    r"\blimited\b|^this\b|^these\b|^which\b|^it\b|artifact|^rib films$|^pelvis|\bimages?\b|"
    r"^(?:similar|improved|increased|decreased|the appearance is|overall|in addition|again)\b|"
    r"^(?:if|consider|please|maybe|may be|exact|unclear|uncertain)\b|(?:would|may|could) be (?:helpful|useful|"
    r"informative|performed|initiated)|(?:^| )(?:knee|knees|foot|elbow|forearm|hip|humer\w*|glen\w*|"
    r"acromioclavicular|coracoclavicular|metacarp\w*|calcane\w*|colon\w*|bowel|stool|rectum|kidneys?|renal|"
    r"stomach|esophag\w*|shoulder|scapula|clavic\w*|film|projection|obese|shielded|chin|mandible|"
    r"faxed|neck)\b|excluded clinically|should be excluded|prior report|^see\b|as above|described above"
)
# Words that mark an out-of-vocabulary sentence as stating something abnormal (kept), and
# words of normal statements (not kept: the explicit negatives cover the chest).
_ABNORMAL_HINT = re.compile(
    r"\blow\b|elevat|eventrat|scar|hypoinfl|calcif|\blarge|increas|decreas|deform|fibros|thicken|"
    r"promin|surgical|clip|status post|post-?surgical|postoperative|resect|ectomy|wire|suture|fusion|"
    r"kyphos|lucen|osteopen|demineral|fullness|shift|interstitial|\bfree air|hardware|orif|plate|screw|"
    r"foreign|pectus|bullet|shrapnel|markings|crowding|poor|limited|rotat|\bnew\b|fluid|mild|"
    r"moderate|severe|small|abnormal\b|cyst|lesion|tortu"
)
_NORMAL_WORDS = re.compile(
    r"\bnormal\b|unremarkable|intact|\bclear\b|\bno\b|negative|without|not remarkable|well[- ]?"
    r"(?:aerated|expanded|inflated)|unchanged|stable|within normal|\bnot\b|grossly"
)


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


def located_sentence(noun: str, laterality: str | None, zone: str | None) -> str:
    s = noun + _location(Finding("lung_opacity", "positive", laterality, None, zone))
    return s[0].upper() + s[1:] + "."


def _canonical(low: str) -> str | None:
    for rx, canonical in _CANONICAL_RE:
        m = rx.search(low)
        if m:
            side = next((v for k, v in m.groupdict().items() if k.startswith("side") and v), "")
            return canonical.format(side=side)
    for rx, noun in _LOCATED_RE:
        if rx.search(low):
            return located_sentence(noun, laterality(low), zone(low))
    return None


# Pieces of a sentence handled on their own ("Low lung volumes, otherwise clear").
_PIECES = re.compile(r",\s+|\s+(?=(?:without|but|however|otherwise)\b)", re.I)
_NEGATED = re.compile(r"(?:there is |there are )?(?:no|negative for|without)\b")


def _hedged(low: str) -> bool:
    return bool(
        re.search(
            r"\b(?:question\w*|possib\w*|may|might|could|concern\w*|suspect\w*|probabl\w*|"
            r"cannot exclude|suggest\w*|presumed)\b",
            low,
        )
    )


def _judge(raw: str) -> tuple[str, str | None]:
    """("keep", sentence), ("drop", None) or ("raw", cleaned) for one out-of-vocabulary text piece."""
    if re.search(r"x{4}", raw, re.I) and not re.search(r"x-xxxx|no xxxx of", raw, re.I):
        return "drop", None  # a de-identified word cannot be restored faithfully
    s = clean_sentence(raw)
    low = s.lower().rstrip(".")
    if len(re.findall(r"[a-z]{2,}", low)) < 2 or _META.search(low):
        return "drop", None
    canonical = _canonical(low)
    negated = _NEGATED.match(low)
    if negated and canonical is not None and not canonical.startswith("No "):
        canonical = None  # "no scarring" must not become "Scarring."
    if canonical is not None:
        if (
            _hedged(low)
            and not canonical.startswith(("No ", "Possible ", "The "))
            and "recommended" not in canonical
        ):
            canonical = "Possible " + canonical[0].lower() + canonical[1:]
        return "keep", canonical
    if negated or (not _ABNORMAL_HINT.search(low) and _NORMAL_WORDS.search(low)):
        return "drop", None  # a normal statement outside the vocabulary
    return "raw", s


def out_of_vocabulary(text: str) -> list[str]:
    """The out-of-vocabulary statements of `text` that are kept (see module doc).

    A sentence without a vocabulary mention is judged whole; if it would be kept as raw text, its
    comma/"without"/"but" pieces are tried, and used when each is canonical or droppable. From a
    sentence with a mention, only canonical pieces without a mention are kept.
    """
    kept: list[str] = []
    for sent in sentences(text or ""):
        pieces = [p for p in _PIECES.split(sent) if p.strip(" ,")]
        if mentions(sent) or says_normal(sent):
            free = [p for p in pieces if not (mentions(p) or says_normal(p))]
            out = [x for v, x in map(_judge, free) if v == "keep"]
        else:
            verdict, whole = _judge(sent)
            out = [whole] if verdict != "drop" else []
            if verdict == "raw" and len(pieces) > 1:
                judged = [_judge(p) for p in pieces]
                if all(v != "raw" for v, _ in judged):
                    out = [x for v, x in judged if v == "keep"]
        for x in out:
            if x not in kept:
                kept.append(x)
    return kept


_HEALED = re.compile(
    r"(?:old|healed|healing|remote|chronic|prior)\b[^.;]{0,40}fractur|fractur[^.;]{0,40}\b(?:old|healed|healing|remote|chronic)\b",
    re.I,
)


def healed_sentence(f: Finding) -> str:
    """A fracture the report calls old or healed: "Healed left rib fracture." (not acute)."""
    s = finding_sentence(f)
    return "Healed " + s[0].lower() + s[1:]


def normalize_report(findings: str, impression: str, labels: Findings | None = None) -> dict:
    """Structured English `{"findings", "impression"}` with explicit negatives (see module doc)."""
    if labels is None:
        labels = label_report(f"{findings}\n{impression}")
    shown = [labels[o] for o in OBSERVATIONS if o in labels and o != "no_finding"]
    present = [f for f in shown if f.status in ("positive", "uncertain")]
    healed = (
        "fracture" in labels
        and labels["fracture"].status == "positive"
        and bool(_HEALED.search(f"{findings}\n{impression}"))
    )
    negated = [
        o
        for o in OBSERVATIONS
        if o in NEGATIVE_SENTENCES
        and (o not in {f.observation for f in present} or (o == "fracture" and healed))
        and (
            o in ALWAYS_NEGATED
            or (o in labels and labels[o].status == "negative")
            or (o == "fracture" and healed)
        )
    ]

    def sentence(f: Finding) -> str:
        return healed_sentence(f) if healed and f.observation == "fracture" else finding_sentence(f)

    oov_f = out_of_vocabulary(findings)
    oov_i = [s for s in out_of_vocabulary(impression) if s not in oov_f]
    if not labels and not oov_f and not oov_i and not says_normal(f"{findings}\n{impression}"):
        # Nothing readable ("See prior report.", an empty section): writing a normal report with
        # explicit negatives would invent findings, so the target is empty and the caller drops it.
        return {"findings": "", "impression": ""}
    body = [sentence(f) for f in present] + oov_f + [NEGATIVE_SENTENCES[o] for o in negated]

    # The impression: acute findings first; chronic ones (extras, a healed fracture) after.
    acute = [
        f
        for f in present
        if f.observation in CHEXPERT14
        and f.observation != "support_devices"
        and not (healed and f.observation == "fracture")
    ]
    chronic = [f for f in present if f not in acute and f.observation != "support_devices"]
    impression_parts = (
        ([finding_sentence(f) for f in acute] or [NO_ACUTE]) + [sentence(f) for f in chronic] + oov_i
    )
    return {"findings": " ".join(body), "impression": " ".join(impression_parts)}


# ---------------------------------------------------------------------------------------------
# Consistency check (issue 14, item 11): the target must carry the source report's labels.

CHANGE_KINDS: tuple[str, ...] = ("flipped", "appeared", "vanished")


def label_changes(source: Findings, target: Findings) -> list[dict]:
    """Observations whose status differs between the source report's labels and the labels of
    its target text (`label_report` on the normalized English, or on a Chinese copy mapped back
    with `zh_to_en`). One dict per change, sorted by observation:
    `{"observation", "kind", "source", "target"}` with statuses or None.

    - "flipped": labeled in both with different statuses (positive / uncertain / negative);
    - "appeared": not labeled in the source, positive or uncertain in the target;
    - "vanished": labeled in the source, not at all in the target.

    A negative that only the target states ("No pneumothorax." for a report silent about it) is
    not a change: the normalizer states `ALWAYS_NEGATED` on purpose. Neither is a `no_finding`
    that the target states where the source said nothing it could label ("no_finding" positive
    in the target, absent in the source), for the same reason.
    """
    changes = []
    for obs in sorted(set(source) | set(target)):
        a = source[obs].status if obs in source else None
        b = target[obs].status if obs in target else None
        if a == b:
            continue
        if a is None:
            if b == "negative" or obs == "no_finding":
                continue
            kind = "appeared"
        elif b is None:
            kind = "vanished"
        else:
            kind = "flipped"
        changes.append({"observation": obs, "kind": kind, "source": a, "target": b})
    return changes


def target_changes(source: Findings, target: dict) -> list[dict]:
    """`label_changes` of a target `{"findings", "impression"}` in English against `source`."""
    return label_changes(
        source, label_report(f"{target.get('findings', '')}\n{target.get('impression', '')}")
    )
