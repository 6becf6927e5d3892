"""Rule-based labeler: report text -> `Findings` (CheXpert-14 plus the extras).

Written in the spirit of the NegBio / CheXpert labelers (Irvin et al. 2019, "CheXpert", AAAI)
without their parser, with the trigger conventions of NegEx (Chapman et al. 2001) and ConText
(Harkema et al. 2009). docs/LABELER.md describes every rule with examples.

1. The text is cut into sentences (., ;, newline) and clauses at words that end a scope ("but",
   "however", "although", "which", ...; ConText's terminators).
2. Mentions: each observation has a table of regular expressions (`MENTIONS`); a hit is a mention.
   `NORMAL_STATEMENTS` are whole phrases that deny an observation ("heart size is normal").
   "line" is a device only in device context (`_DEVICE_LINE`). A mention after a hypothetical
   trigger (`HYPOTHETICAL`: "if", "to identify", "detecting"; ConText) gets no label at all.
3. Explanations: "X represents / is due to / is consistent with Y" splits the clause; X is judged
   on the words before the verb, and is dropped when Y is a benign look-alike (`BENIGN_CAUSES`:
   nipple shadow, overlapping soft tissue, technique, ...).
4. Status of a mention (`_status`), in the order of the CheXpert labeler's stages: pre-negation
   uncertainty and NegEx pseudo-negations masked ("cannot exclude", "no interval change in"),
   then negation (`PRE_NEG` forward, `POST_NEG` backward, hedges against: "unlikely", "rather
   than", "less likely"), then uncertainty (`UNCERTAIN` clause-wide, `FWD_UNCERTAIN` forward
   only: "possible", "probable"); otherwise positive.
5. One status per observation and study: positive beats uncertain beats negative, so "no new
   effusion; small left effusion" is positive.
6. Attributes from the clause of the chosen mention: laterality, severity, zone, subtype.

`no_finding` (decided here, documented in docs/LABELER.md): positive when the text mentions at least
one observation or says the study is normal, and no observation other than `support_devices` is
positive or uncertain (the CheXpert rule, extended to the extras).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from echocxr.data.observations import Finding, Findings

# ---------------------------------------------------------------------------------------------
# Mentions: observation -> patterns (matched on lower-cased text with `XXXX` kept as "xxxx").

_EFF = r"effusions?"
# A "line" is a device only next to a device word: "PICC line", "right subclavian line", "central
# venous line", "lines and tubes", "the line tip", "the line has been removed".
_DEVICE_LINE = (
    r"(?:picc|central|venous|midline|arterial|\biv|jugular|\bij|subclavian|femoral|dialysis|hickman|"
    r"hemodialysis|swan[- ]ganz|\bpa|catheter|port|infusion|triple[- ]lumen|double[- ]lumen)"
    r"(?: [\w-]+)?? lines?\b|\blines?,? (?:and|or|&|/) tubes?\b|\btubes?,? (?:and|or|&|/) lines?\b|"
    r"\blines?/tubes?\b|\bline (?:tip|terminat\w*|courses?|has been (?:removed|placed|with\w*)|is in place)"
)
MENTIONS: dict[str, tuple[str, ...]] = {
    "cardiomegaly": (
        r"cardiomegaly",
        r"cardiac (?:enlargement|hypertrophy)",
        r"enlarge(?:d|ment of the) (?:heart|cardiac (?:silhouette|shadow|size))",
        r"(?:heart|cardiac silhouette|cardiac shadow|cardiac size|heart size|heart shadow)"
        r"(?: size)? (?:is |are |appears |remains |appear )*(?:\w+ ){0,3}enlarged",
        r"borderline (?:heart size|cardiac size|enlarge\w+|cardiomegaly)",
        r"(?:increase|enlargement) (?:in|of) (?:the )?(?:size of the )?(?:heart|cardiac silhouette)(?: size)?",
        r"heart enlargement",
        r"(?:heart|cardiac) size (?:is )?(?:borderline|upper normal|mildly increased|increased|large)",
        r"prominen(?:t|ce of the) (?:heart|cardiac silhouette)",
        r"(?:heart|cardiac silhouette)(?: size)? (?:is |remains |appears )?(?:\w+ ){0,3}(?:large|prominent)\b",
        r"(?:heart|cardiac silhouette|heart size) (?:is )?borderline(?: in size| enlarged)?",
    ),
    "enlarged_cardiomediastinum": (
        r"(?:widen\w*|enlarge\w*) (?:of the )?(?:superior )?mediastin\w*",
        r"mediastin\w* (?:is |appears )?(?:widen\w*|enlarged)",
        r"enlarged cardiomediastinal silhouette",
        r"cardiomediastinal silhouette (?:is |appears )?(?:\w+ )?enlarged",
    ),
    "lung_opacity": (
        r"opacit(?:y|ies)",
        r"opacification",
        r"densit(?:y|ies)",
        r"airspace (?:markings|prominence)",
        r"haziness|hazy",
    ),
    "lung_lesion": (
        # "nodular opacity/density" is an opacity (the IU coders write Opacity/round), not a nodule
        r"nodules?",
        r"fibronodular",
        r"(?<!soft tissue )mass(?:es)?\b",
        r"(?:pulmonary |lung )?lesions?",
        r"neoplasm|tumou?r|malignan\w+|metasta\w+|carcinoma",
    ),
    "edema": (
        r"edema",
        r"(?:vascular|venous) congestion",
        r"congestive (?:heart )?failure|\bchf\b",
        r"cephali[sz]ation",
        r"(?:pulmonary )?vascular (?:congestion|engorgement|redistribution)",
        r"kerley",
        r"heart failure|volume overload",
        r"venous (?:engorgement|hypertension)",
        # prominent central vessels: the IU coders write Pulmonary Congestion
        r"(?:central|pulmonary|lung) (?:\w+ )?vascula\w* (?:(?:is|are|appears?|remains?) )?(?:\w+ )?"
        r"(?:prominen\w*|engorge\w*|accentuat\w*|increased)|"
        r"(?:prominen\w*|engorge\w*|accentuat\w*|increased) (?:of )?(?:the )?(?:\w+ ){0,2}(?:vascula\w*|vessels)",
    ),
    "consolidation": (
        r"consolidat\w*",
        # "airspace opacity" is an opacity (the IU coders write Opacity, not Airspace Disease)
        r"air ?space (?:disease|process|consolidation)",
        r"infiltrat\w*",
    ),
    "pneumonia": (
        r"pneumonia",
        r"pneumonitis",
        r"infectio(?:n|us)",
        r"bronchopneumonia",
    ),
    "atelectasis": (
        r"atelecta\w+",
        r"(?:lobar |lobe |segmental )collapse",
        r"collapse of the",
    ),
    "pneumothorax": (r"pneumothora(?:x|ces)", r"pneumothoraxes"),
    "pleural_effusion": (
        r"(?<!pericardial )" + _EFF,
        r"hydrothorax",
        r"(?:blunt\w*|obliterat\w*) (?:of )?(?:the )?(?:\w+ ){0,3}(?:costophrenic|cp\b|sulcus|sulci)",
        r"(?:costophrenic|\bcp|sulcus|sulci)\b(?: \w+){0,2}? blunt\w*",
        r"pleural fluid",
    ),
    "pleural_other": (
        r"pleural (?:thickening|plaques?|scarring|calcification|reaction)",
        r"(?:apical|pleural) (?:cap|capping)",
        r"fibrothorax",
        r"pleural[- ]parenchymal scarring",
        r"fissur\w* thickening|thickening of the (?:\w+ )?fissures?|thickened (?:\w+ )?fissures?",
    ),
    "fracture": (r"fractur\w*", r"\bfx\b"),
    "support_devices": (
        r"pacemaker|pacer|\baicd\b|\bicd\b|defibrillator|cardiac (?:device|generator)|"
        r"(?:pacing|pacemaker|cardiac) leads?",
        r"picc|central (?:venous )?(?:line|catheter)|venous catheter|port-?a-?cath|"
        r"(?:chest |venous |central |power )?\bport\b|\bswan|\bcatheter|\bdialysis catheter",
        r"endotracheal|\bet tube|\bett\b|tracheostomy",
        r"(?:nasogastric|orogastric|feeding|enteric|\bng|\bog|dobhoff|gastric) tube",
        r"chest tubes?|pleural (?:drain|catheter)|thoracostomy",
        # "line" only in device context (item 10 of issue 14): not lung, septal, Kerley, pleural,
        # fissure or suture lines.
        _DEVICE_LINE,
        # de-identified catheters: "left chest XXXX with tip in the SVC", "XXXX-a-XXXX" (port-a-cath)
        r"\btip\b(?: [\w-]+){0,6}? (?:svc|cavoatrial|caval ?atrial|superior vena|right atri\w+)|xxxx-a-xxxx",
        r"\bstents?\b|stimulator|loop recorder|\bleads?\b|medical device|"
        r"shunt tubing|gastrostomy|nephrostomy|\btips\b|closure device|support devices?",
        # prosthetic heart valves and joint prostheses are support devices (the CheXpert labeler's
        # support-device mentions include "valve" and "arthroplasty"); the IU coders write
        # `Implanted Medical Device/aortic valve` or `/humerus`. Breast prostheses are blanked.
        r"(?:prosthetic|replaced|mechanical|bioprosthetic|artificial) (?:\w+ ){0,2}valves?|"
        r"valves? (?:replacement|prosthes\w+)|septal occluder|"
        r"(?:humeral|humerus|shoulder|hip|knee|joint|head) (?:\w+ )?(?:prosthes[ie]s|arthroplast\w+)|"
        r"prosthetic (?:\w+ ){0,2}(?:humeral|humerus|shoulder|joint)|arthroplast\w+",
    ),
    "calcified_granuloma": (
        r"granulomas?",
        r"granulomatous",
        r"calcified (?:nodules?|lymph nodes?|nodes?|densit\w+|foc\w+)",
        r"calcified (?:\w+ ){0,3}(?:lymph )?(?:nodes?|nodules?)|calcified (?:\w+ ){0,3}lymph xxxx",
        r"calcifications? (?:in|of|within) the (?:\w+ ){0,3}(?:lung|lobe|hil\w+|lymph nodes?)",
        r"(?:hilar|mediastinal|pulmonary|parenchymal|nodal) calcifications?",
    ),
    "hyperinflation": (
        r"hyperinflat\w*",
        r"hyperexpan\w*",
        r"over-?inflat\w*|over-?expan\w*",
        r"emphysema\w*",
        r"\bcopd\b|chronic obstructive",
        r"(?:flatten\w*|flat) (?:of )?(?:the )?(?:\w+ )?(?:hemi)?diaphragms?",
        r"large lung volumes|over[- ]?expanded|(?:retrosternal|substernal) (?:air ?space|clear space)",
        r"(?:hemi)?diaphragms? (?:are |is )?(?:\w+ )?flat\w*",
        r"hyperluc\w+",
        r"increased (?:ap|anteroposterior) diameter",
        r"bullae|bullous",
    ),
    "sternotomy": (
        r"sternotomy",
        r"sternal (?:wires?|sutures?|cerclage)",
        r"\bcabg\b|coronary (?:artery )?bypass",
        r"median sternal",
    ),
    "hiatal_hernia": (r"hiatal hernia", r"hiatus hernia", r"hernia"),
    "scoliosis": (
        r"scolio\w+",
        r"(?:dextro|levo)-?(?:convex )?curv\w+",
        r"curvature (?:of )?(?:the )?(?:\w+ )?spine|(?:spine|spinal|thoracic|thoracolumbar) (?:\w+ )?curvature",
    ),
    "degenerative_spine": (
        r"spondylo\w+",
        r"senescent",
        r"osteophyt\w+",
        r"spurs?\b|spurring|bridging|endplate",
        r"degenerative",
        r"\bdjd\b",
        r"(?:disc|disk) (?:space )?(?:narrowing|disease)",
        r"(?:arthritic|arthropathic) changes? (?:of|in) the (?:\w+ )?spine",
        r"\bdish\b|diffuse idiopathic skeletal",
    ),
    "aortic_abnormality": (
        r"tortu\w+",
        r"ectatic|ectasia",
        r"unfold\w*",
        r"(?:aortic|aorta|arch|knob) (?:\w+ )?calcifi\w+",
        r"calcifi\w+ (?:of |in |within )?(?:the )?(?:thoracic )?(?:aort\w+|arch|knob)",
        r"atheroscl\w+|atheromatous",
        r"calcified (?:thoracic )?aort\w+",
    ),
}

# Context conditions: a mention of these observations counts only when its clause also matches.
_CONTEXT: dict[str, str] = {
    "degenerative_spine": r"spine|spinal|vertebra|thoracic|lumbar|cervical|dorsal|spondyl|osteophyt|"
    r"disc|disk|endplate|djd|dish\b|skeletal",
    "aortic_abnormality": r"aort|arch|knob|atheroscl|atheromatous",
    "hiatal_hernia": r"hiatal|hiatus|hernia",
}
# Explanations (item 9 of issue 14). In "X represents / is due to / is consistent with Y" the clause
# splits at the explanation verb: X is what is seen, Y what the reader thinks it is. A hedge inside
# the explanation ("X may represent Y") makes Y uncertain, not X (ConText's forward scope, Harkema
# et al. 2009). When Y is a look-alike that is no disease of the chest (`BENIGN_CAUSES`: a nipple
# shadow, overlapping soft tissue or vessels, technique, a fat pad, a pectus deformity), X is
# explained away and is not a finding at all. When Y is a finding (atelectasis, scarring), X stays
# present and Y is labeled as well.
EXPLAIN = (
    r"(?:\b(?:which|that|and|most|more|likely|probably|possibly|may|might|could|can|xxxx) )*"
    r"(?:\b(?:is|are|be|being|was|were|felt to be|thought to be) )?"
    r"\b(?:represent\w*|reflect\w*|(?:due|secondary|related|attributable|attributed) to|"
    r"(?:consistent|compatible) with|caused by|accounts? for)\b"
)
BENIGN_CAUSES = (
    r"nipples?",
    r"breast",
    r"soft[- ]tissues?",
    r"(?:overlap\w*|overlying|superimpos\w*|superimposition|confluence|summation)",
    r"(?:vascular|vessel\w*) (?:shadows?|structures?|markings)|vessels? (?:seen )?(?:on end|end[- ]on)",
    r"costochondral|costal cartilage",
    r"skin ?folds?|artifact\w*|clothing|hair|braids?",
    r"(?:epicardial|pericardial|mediastinal|cardiophrenic)? ?fat(?: pads?)?\b",
    r"pectus",
    r"scapula\w*|scapular",
    r"\bribs?\b|\bbone\w*|osseous",
)
# Technique explains an apparent large heart, wide mediastinum, crowded vessels or a hazy base,
# but not atelectasis ("bibasilar atelectasis due to low lung volumes" is atelectasis).
_TECHNIQUE = (
    r"technique|projection\w*|positioning|position|rotation|rotated|portable|\bap\b|supine|lordotic|"
    r"(?:low|poor|shallow|decreased) (?:lung volumes?|inspiration|inspiratory|inflation)|hypoinflation|"
    r"underinflation|habitus|obesity|cachexia"
)
# Causes that explain away one observation only: blunted costophrenic angles that are pleural
# thickening are no effusion; an enlarged-looking mediastinum that is a tortuous aorta is no mass.
BENIGN_CAUSES_FOR: dict[str, str] = {
    "pleural_effusion": r"pleural (?:thickening|scar\w*|reaction)|scar\w*|fat\b",
    "enlarged_cardiomediastinum": r"tortu\w+|ectatic|unfold\w*|vessels?|vascular|aort\w+|" + _TECHNIQUE,
    "cardiomegaly": _TECHNIQUE,
    "lung_opacity": _TECHNIQUE,
    "edema": _TECHNIQUE,
    "hyperinflation": _TECHNIQUE,
}
# Findings in the lung or pleura: an explanation that also names one of them ("superimposed rib
# lesions versus developing pulmonary nodules") does not explain the mention away.
_PULMONARY = (
    "lung_opacity",
    "lung_lesion",
    "consolidation",
    "pneumonia",
    "atelectasis",
    "edema",
    "pleural_effusion",
    "pneumothorax",
)
# Mentions that are something else: matched spans are blanked before mention search.
_NOT_MENTIONS: tuple[str, ...] = (
    r"pericardial effusion",
    r"soft tissue (?:density|densities|opacity|mass)",
    r"breast (?:tissue )?(?:density|densities|shadows?|opacit\w+)",
    r"nipple (?:shadows?|opacit\w+)",
    r"(?:bone|bony|osseous|skeletal) (?:density|densities|mineralization)",
    r"density of the (?:bones?|osseous)",
    r"(?:no )?(?:acute )?(?:bony|osseous) (?:abnormality|lesions?)",
    r"degenerative (?:changes? |disease )?(?:of|in) the (?:\w+ )?(?:shoulders?|joints?|ac joint|"
    r"acromioclavicular|glenohumeral)",
    r"(?:shoulder|joint|acromioclavicular|glenohumeral)s? (?:\w+ )?degenerative",
    r"tortuous (?:\w+ )?(?:trachea|vessels?|vasculature|artery|arteries|brachiocephalic)",
    r"tortuosity of the (?:\w+ )?(?:trachea|vessels?|brachiocephalic|great vessels)",
    r"bony lesions?",
    # a lesion of a bone is no lung lesion: "expansile lesion of the right posterior 9th rib",
    # "sclerotic lesion in the left proximal clavicle", "lytic rib lesions"
    r"(?:sclerotic|lytic|blastic|expansile|destructive|osseous|skeletal|bone|rib|clavic\w*|vertebral|"
    r"spin\w+|humeral|scapular|sternal) (?:\w+ )?lesions?|"
    r"lesions? (?:\w+ )?(?:of|in|involving|within) the (?:\w+ ){0,3}(?:ribs?|clavicles?|vertebra\w*|"
    r"vertebral body|spine|humer\w*|scapula|sternum|bones?)\b",
    r"breast (?:prosthes[ie]s|implants?)",
    # hernias other than hiatal: "Bochdalek hernia", "Morgagni hernia", "small hernia (Bochdalek)"
    r"(?:bochdalek|morgagni|diaphragmatic|ventral|inguinal|umbilical|incisional|abdominal wall|"
    r"parastomal|lung|pulmonary) hernias?|hernias?,? \(?(?:bochdalek|morgagni)\b",
    # a broken device part is not a bone fracture (only the word "fracture" is blanked)
    r"fractur\w*(?= (?:\w+ ){0,3}(?:leads?|wires?|xxxx|screws?|catheters?|hardware|plates?|rods?))|"
    r"(?:catheter|screw|hardware|plate|rod|wire|lead)s? (?:is |are |was |were |has been )?fractur\w*",
    r"skin (?:lines?|folds?)",
    # external monitoring leads lie on the skin: no device in the patient
    r"(?:(?:external|cardiac|ekg|ecg|telemetry) )?(?:monitor\w*|ekg|ecg|telemetry) (?:\w+ )?leads?|"
    r"(?:overlying|external) (?:\w+ )?leads?",
)

# Whole phrases that deny an observation without a negation word.
NORMAL_STATEMENTS: dict[str, tuple[str, ...]] = {
    "cardiomegaly": (
        r"(?:heart|cardiac|cardiomediastinal|cardiopericardial|cardiothymic)(?: silhouette| shadow| size|"
        r" contours?)*(?: and (?:the )?(?:\w+ ){0,3})?(?: size)? (?:is |are |appears? |remains? |"
        r"was |were )*(?:grossly |overall |otherwise |again |stably )*(?:normal|within normal|"
        r"unremarkable|stable and normal|upper normal size|not enlarged|unchanged and normal|"
        r"within the normal)",
        r"normal (?:\w+ )?(?:heart|cardiac|cardiomediastinal)(?: size| silhouette| contours?)?",
        r"heart is not enlarged",
        r"no (?:\w+ )?cardiac enlargement",
    ),
    "enlarged_cardiomediastinum": (
        r"(?:cardiomediastinal|mediastinal|cardiomediastinum|mediastinum)(?: silhouette| contours?| size)*"
        r"(?: and (?:\w+ ){1,3})? (?:is |are |appears? |remains? )*(?:grossly |again |otherwise )*"
        r"(?:normal|within normal|unremarkable|stable)",
        r"normal (?:\w+ )?(?:cardiomediastinal|mediastinal)(?: silhouette| contours?| size)?",
    ),
    "pleural_effusion": (
        r"costophrenic (?:angles?|sulci|recesses) (?:are |is )?(?:clear|sharp|preserved|normal)",
        r"(?:sharp|clear) costophrenic",
    ),
    "consolidation": (r"lungs? (?:fields )?(?:are |is |remain |appear )?(?:grossly |otherwise )?clear",),
    "lung_opacity": (r"lungs? (?:fields )?(?:are |is |remain |appear )?(?:grossly |otherwise )?clear",),
    "edema": (r"(?:pulmonary )?vascular(?:ity| markings| pattern)? (?:is |are )?(?:normal|within normal)",),
    "pneumothorax": (),
}
# Statements that the whole study is normal.
NORMAL_STUDY = (
    r"(?:\bno|negative for|without)\b(?: [\w/,-]+){0,6}? (?:acute|active)\b(?: [\w/,-]+){0,5}? "
    r"(?:disease|abnormalit\w+|process|findings?|pathology|change)",
    r"normal (?:pa and lateral |frontal and lateral |two view |2 view )?(?:chest|study|exam\w*|radiograph|x-ray)",
    r"no (?:radiographic )?evidence of (?:acute |active )?(?:cardiopulmonary )?disease",
    r"(?:chest|lungs?) (?:is |are )?(?:radiographically )?normal",
    r"no (?:acute )?(?:cardiopulmonary )?(?:abnormality|abnormalities)",
    r"within normal limits",
    r"negative (?:chest|study|exam)",
    r"unremarkable (?:chest|study|exam|radiographs? of the chest)",
    r"(?:lungs|pleura)\b[^.]{0,60} (?:are|is) (?:all )?(?:normal|unremarkable)$",
)

# ---------------------------------------------------------------------------------------------
# Triggers.

# NegEx pseudo-negations (Chapman et al. 2001): phrases with a negation word that deny a change,
# not the finding ("no significant interval change in the small left effusion", "not worse"). They
# are masked before the negation search, so the finding they name is present (item 7 of issue 14).
_CHANGE_QUALIFIERS = (
    r"(?:significant|interval|appreciable|substantial|definite|definitive|major|marked|acute|"
    r"radiographic|visible|detectable|apparent|real|gross|overall|notable|measurable|important|"
    r"meaningful|further|recent|convincing|evidence of|signs? of|short[- ]term|\w+ly)"
)
_CHANGES = (
    r"(?:change|changes|changed|increase|increases|decrease|decreases|worsening|progression|difference|"
    r"growth|enlargement in size|increase in size)"
)
PSEUDO_NEG = (
    rf"\bno\b(?: {_CHANGE_QUALIFIERS})* {_CHANGES}\b",
    rf"\bnot\b(?: (?:been|{_CHANGE_QUALIFIERS}))* (?:changed|worse|worsened|progressed|grown|different)\b",
    r"\bno (?:worse|bigger|larger)\b",
    r"\bnot only\b|\bnot otherwise\b",
    # "not fully evaluated / not well assessed": the finding is stated, its assessment limited
    r"\bnot (?:as |so |very )?(?:well|optimally|completely|fully)\b(?= (?:evaluated|assessed)\b)",
)
# Pseudo-negations by grammar (item 17 of issue 22): a negation cue, at most four modifier words
# that name no finding, then a change-word, so the finding is the change's object ("without
# significant change in X", "no suspicious change in X", "no interval change of the X", "not
# significantly changed X", "X has not changed"). After "no"/"without" the change-word is a noun
# ("no increased density" denies the density); after "not" a participle or comparative.
_NEG_CUE_BEFORE_CHANGE = re.compile(r"\b(?:no|not|without|nor|never)\b")
_CHANGE_NOUN = re.compile(
    r"(?:changes?|increases?|decreases?|worsening|progression|difference|differences|growth|"
    r"improvement|evolution|enlargement in size|increase in size|deterioration|alteration)$"
)
_CHANGE_PARTICIPLE = re.compile(
    r"(?:changed|worse|worsened|progressed|grown|different|improved|altered|evolved|deteriorated)$"
)
# Non-visualisation (item 15 of issue 22): "X is not well seen" says X cannot be judged, not that X
# is there. The mention is uncertain, and weaker than any other mention of X in the report: "No large
# pneumothorax" outranks "pneumothorax is not well seen".
POORLY_SEEN = (
    r"\bnot (?:as |so |very |particularly )?(?:well|optimally|completely|fully|adequately)"
    r"(?: (?:seen|demonstrated|visuali[sz]ed|appreciated|identified|imaged|delineated|defined|depicted|"
    r"shown|profiled))",
    r"\bpoorly (?:seen|demonstrated|visuali[sz]ed|appreciated|delineated|defined|depicted)",
    r"\b(?:seen|visuali[sz]ed|demonstrated) poorly\b",
)
# Negation and hedges against a finding. Forward triggers (NegEx "pre-negation"; CheXpert
# "negation" rules, Irvin et al. 2019) negate mentions after them in their scope; `POST_NEG` ones
# ("X is unlikely", "X has resolved") negate the mention just before. A finding argued against is
# negative (item 8 of issue 14): "unlikely", "A rather than X", "less likely X", "without
# convincing evidence of X", "not likely" -- ConText's "definite negated existence" triggers
# (Harkema et al. 2009) for "rather than"/"unlikely".
PRE_NEG = (
    r"\bno\b(?! (?:longer|further)\b)",
    r"\bnot\b",
    r"\bwithout\b",
    r"negative for",
    r"free of",
    r"clear of",
    r"\bclear(?= (?:focal |acute )?(?:air ?space|consolidation|infiltrat))",  # "lungs are clear airspace disease"
    r"absence of",
    r"resolution of",
    r"resolved",
    r"\bnor\b",
    r"\bneither\b",
    r"rule[sd]? out",
    r"\bexclud\w+",
    r"\bnegative\b",
    r"removal of",
    r"\bremoved\b",
    r"\bnone\b",
    r"rather than",
    r"instead of",
    r"\bless likely\b",
    r"\bunlikely\b",
    r"\bargues? against",
)
POST_NEG = (
    r"(?:is|are|was|were|has|have|be|been)? ?(?:no longer|not) (?:\w+ )?(?:seen|identified|"
    r"visuali[sz]ed|present|demonstrated|evident|appreciated|noted|detected|visible|apparent|"
    r"definitely seen|clearly seen)",
    r"(?:has|have|is|are) (?:\w+ )?resolved",
    r"resolved",
    r"(?:is|are|has been|have been) removed",
    r"(?:is|are) absent",
    r"(?:is|are|has|have|been) (?:\w+ )?excluded",
    r"(?:is|are) not (?:enlarged|widened|increased)",
    r"(?:is|are) (?:\w+ )?(?:normal|within normal)",
    r"(?:appears?|is|are) (?:\w+ )?within (?:the )?(?:limits of normal|normal limits)",
    r"(?:is|are|was|were|seems?|appears?|felt|thought|considered|be|felt to be|thought to be)? ?"
    r"(?:very |much |considered |felt |thought )?(?:unlikely|improbable|doubtful|not likely|less likely|"
    r"not favou?red|not suspected)(?=\s*$|\s*,|\s(?:and|but|as|since|because|given|in|on|at)\b)",
)
UNCERTAIN = (
    r"\bmay\b",
    r"\bmight\b",
    r"\bcould\b",
    r"\b(?:is|are|be|remains?) (?:also |still )?possible\b",
    r"\bpotential\w*",
    r"cannot (?:be )?(?:entirely |completely |definitely |definitively )?(?:exclude\w*|rule\w* out|"
    r"excluded|ruled out|eliminated)",
    r"can not be excluded|not (?:be )?excluded|not ruled out|difficult to exclude|"
    r"(?:cannot|can't) exclude",
    r"question\w*",
    r"\bquery\b",
    r"suspicio\w+",
    r"suspect\w*",
    r"concern\w* (?:for|of)",
    r"suggest\w* (?:the )?(?:possibility|differential)",
    r"\bequivocal\b",
    r"(?<!age-)(?<!age )indeterminate",  # an "age-indeterminate fracture" is a fracture
    r"not (?:entirely )?(?:certain|sure|clear)",
    r"\buncertain\b",
    r"\bunclear\b",
    r"\bpresumed\b",
    r"(?:cannot|can not) be (?:assessed|evaluated)",
    r"\b(?:evaluat\w*|assess\w*|look\w*|search\w*) for\b",
    r"obscur\w+",
)
# Hedges for the words after them only (ConText's forward-scoped "possible", Harkema et al.
# 2009): "right paratracheal mass, possibly lymphadenopathy" hedges the lymphadenopathy, not the
# mass. "probable X" hedges X; "probably represents" reads like "likely" (positive).
FWD_UNCERTAIN = (
    r"\bpossib\w+",
    r"\bprobable\b",
    r"differential",  # "most suggestive of edema, differential includes infection"
)
# Alternatives (item 16 of issue 22; the CheXpert labeler's "versus" / "or" uncertainty rules): the
# findings offered as alternatives ("atelectasis versus pneumonia", "atelectasis vs. pneumonia",
# "effusion or atelectasis", "atelectasis/consolidation") are uncertain, each of them; a finding in
# the same clause that is not one of the alternatives keeps its own status ("Bibasilar opacities,
# atelectasis versus pneumonia": the opacities are certain). A mention is an alternative when the
# operator follows it within four words, or precedes it within three, with no comma in between.
_ALT_OP = r"(?:\bversus\b|\bvs\b\.?|\band/or\b|\bor\b|/)"
# "Atelectasis or less likely pneumonia" argues against the second: the first is no alternative.
_ALT_AFTER = re.compile(
    rf"^(?:\s+[\w-]+){{0,4}}?\s*{_ALT_OP}\s*(?!less likely|unlikely|not\b|much less)((?:[\w-]+ ?){{1,4}})"
)
_ALT_BEFORE = re.compile(rf"((?:[\w-]+ ?){{1,4}}?)\s*{_ALT_OP}\s*(?:[\w-]+\s+){{0,3}}$")
# Verbless and coordinated normal statements (item 14 of issue 22): "Heart and mediastinum normal.",
# "Heart, mediastinum and hila unremarkable.", "Lungs and pleural spaces clear." Each subject of the
# list that names an organ with an observation denies that observation.
_NORMAL_SUBJECTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"(?:heart|cardiac)(?: size| silhouette| shadow| contours?)*", ("cardiomegaly",)),
    (
        r"cardiomediastinal(?: silhouette| contours?| size)*|cardiomediastinum",
        ("cardiomegaly", "enlarged_cardiomediastinum"),
    ),
    (r"mediastinum|mediastinal(?: silhouette| contours?| width| size)*", ("enlarged_cardiomediastinum",)),
    (
        r"lungs?(?: fields| parenchyma)?|lung parenchyma|pulmonary parenchyma",
        ("lung_opacity", "consolidation"),
    ),
    (r"pleura|pleural (?:spaces?|surfaces?)", ("pleural_effusion", "pneumothorax")),
    (r"costophrenic (?:angles?|sulci|recesses)", ("pleural_effusion",)),
    (r"(?:pulmonary )?vascularity|pulmonary vasculature|pulmonary vessels|vascular markings", ("edema",)),
)
_OTHER_SUBJECTS = (
    r"great vessels|hila|hilar (?:contours?|structures?|regions?)|hilum|trachea|airways?|bones|bony thorax|"
    r"osseous structures|soft tissues|(?:hemi)?diaphragms?|aorta|thoracic aorta"
)
_SUBJECT = "|".join([*(p for p, _ in _NORMAL_SUBJECTS), _OTHER_SUBJECTS])
_NORMAL_LIST_RE = re.compile(
    rf"(?<![\w-])(?:the )?(?:{_SUBJECT})(?:(?:,| and|, and| &| as well as) (?:the )?(?:{_SUBJECT}))*"
    r" (?:(?:is|are|appears?|remains?|was|were|looks?|seems?) )?(?:grossly |otherwise |overall |again |"
    r"essentially |stably |all |both )*(?:normal|unremarkable|clear|within normal limits|"
    r"not enlarged)\b"
)
_NORMAL_SUBJECT_RE = [(re.compile(rf"(?<![\w-])(?:{p})(?![\w-])"), obs) for p, obs in _NORMAL_SUBJECTS]

# Hypothetical mentions (ConText's "hypothetical" category, Harkema et al. 2009): a finding named as
# the object of a search or a condition ("CT is more sensitive in detecting small nodules", "if
# there is concern for fracture, consider rib films", "further evaluation ... to identify a small
# nodule") is said of no patient, so a mention after one of these in its clause gets no label at
# all: neither present nor denied. "if any" hedges a grade ("small, if any, effusion"), not a search.
HYPOTHETICAL = (
    r"\bif\b(?!,? any\b)",
    r"\bto (?:identify|detect|confirm|localize|search for|screen for)\b",
    r"\bdetect(?:ing|ion of)\b",
    r"\bsensitive (?:in|for|to)\b",
)
# Words that end a negation scope inside a sentence.
_SCOPE_BREAK = re.compile(
    r"\b(?:but|however|although|though|whereas|which|except|aside from|apart from|"
    r"with the exception of|other than|otherwise|there is|there are|there has been|"
    r"while|again (?:seen|noted))\b"
)
# After a comma, a new statement (not a list item) starts with one of these.
_NEW_STATEMENT = re.compile(
    r"^\s*(?:and )?(?:mild\w*|minimal|small|moderate\w*|large|severe\w*|marked\w*|slight\w*|"
    r"trace|stable|unchanged|persistent|new|left|right|bilateral|the|a|an|there|heart|lungs?|"
    r"with|which|\w+ (?:is|are|was|were|has|have))\b"
)

# ---------------------------------------------------------------------------------------------
# Attributes.

_SEVERITY: tuple[tuple[str, str], ...] = (
    (r"mild(?:ly)?[- ]to[- ]moderate(?:ly)?", "moderate"),
    (r"moderate(?:ly)?[- ]to[- ](?:severe|large|marked)(?:ly)?", "severe"),
    (r"\b(?:severe(?:ly)?|large|marked(?:ly)?|massive|extensive|significant(?:ly)?|huge)\b", "severe"),
    (r"\bmoderate(?:ly)?\b", "moderate"),
    (
        r"\b(?:mild(?:ly)?|minimal(?:ly)?|small|tiny|trace|slight(?:ly)?|minor|subtle|borderline|"
        r"upper limits?|top normal|upper normal|minimally)\b",
        "mild",
    ),
)
_BILATERAL = re.compile(
    r"\b(?:bilateral\w*|both|bibasilar|bibasal|biapical|bilaterally|left and right|"
    r"right and left)\b"
)
_LEFT = re.compile(r"\bleft\b|\blingul\w*")
_RIGHT = re.compile(r"\bright\b")
_ZONES: tuple[tuple[str, str], ...] = (
    (r"upper lobes?|upper lung|apex|apices|apical|biapical|upper zone", "upper"),
    (r"middle lobe|lingul\w*|mid(?:dle)?[- ]?lung|midlung|perihilar|hilar|hila\b|mid zone", "middle"),
    (
        r"lower lobes?|lower lung|bases?\b|basilar|basal|bibasilar|bibasal|retrocardiac|costophrenic|"
        r"lower zone|infrahilar",
        "lower",
    ),
)
_SUBTYPES: dict[str, tuple[tuple[str, str], ...]] = {
    "lung_lesion": ((r"\bmass", "mass"), (r"nodul", "nodule")),
    "atelectasis": (
        (r"linear|plate|discoid|subsegmental|streak|band", "linear"),
        (r"lobar|collapse|lobe atelecta|segmental", "lobar"),
    ),
    "support_devices": (
        (r"pacemaker|pacer|aicd|\bicd\b|defibrillator|cardiac (?:device|generator)|leads?\b", "pacemaker"),
        (r"endotracheal|\bet tube|\bett\b|tracheostomy", "endotracheal_tube"),
        (r"nasogastric|orogastric|feeding|enteric|\bng\b|\bog\b|dobhoff|gastric tube", "ng_tube"),
        (r"chest tube|pleural (?:drain|catheter)|thoracostomy", "chest_tube"),
        (r"picc|central|venous|port|swan|catheter|line|svc|cavoatrial|caval|xxxx-a-xxxx", "central_line"),
    ),
    "fracture": (
        (r"\bribs?\b", "rib"),
        (r"clavic", "clavicle"),
        (r"spine|vertebra|compression|thoracic|lumbar|\b[tl]\d", "spine"),
    ),
    "edema": (
        (r"edema|chf|failure|kerley", "edema"),
        (r"congestion|cephali|engorge|redistribution|vascula|vessel", "vascular_congestion"),
    ),
    "aortic_abnormality": (
        (r"tortu|ectat|ectasia|unfold", "tortuous"),
        (r"calcifi|atheroscl|atheromatous", "calcified"),
    ),
}
_LATERAL_OBS = {
    "lung_opacity",
    "lung_lesion",
    "consolidation",
    "pneumonia",
    "atelectasis",
    "pneumothorax",
    "pleural_effusion",
    "pleural_other",
    "fracture",
    "calcified_granuloma",
    "edema",
}
_ZONE_OBS = {
    "lung_opacity",
    "lung_lesion",
    "consolidation",
    "pneumonia",
    "atelectasis",
    "calcified_granuloma",
    "pleural_other",
    "edema",
}
_SEVERITY_OBS = {
    "cardiomegaly",
    "lung_opacity",
    "edema",
    "consolidation",
    "atelectasis",
    "pneumothorax",
    "pleural_effusion",
    "hyperinflation",
    "scoliosis",
    "degenerative_spine",
    "enlarged_cardiomediastinum",
    "pleural_other",
    "pneumonia",
    "aortic_abnormality",
    "hiatal_hernia",
}

_STATUS_RANK = {"negative": 0, "uncertain": 1, "positive": 2}


def _compile(patterns: tuple[str, ...]) -> re.Pattern:
    return re.compile("|".join(f"(?:{p})" for p in patterns))


_MENTION_RE = {o: _compile(p) for o, p in MENTIONS.items()}
_NORMAL_RE = {o: _compile(p) for o, p in NORMAL_STATEMENTS.items() if p}
_CONTEXT_RE = {o: re.compile(p) for o, p in _CONTEXT.items()}
_EXPLAIN_RE = re.compile(EXPLAIN)
_BENIGN_RE = _compile(BENIGN_CAUSES)
_BENIGN_FOR_RE = {o: re.compile(p) for o, p in BENIGN_CAUSES_FOR.items()}
_NOT_MENTION_RE = _compile(_NOT_MENTIONS)
_NORMAL_STUDY_RE = _compile(NORMAL_STUDY)
_PRE_NEG_RE = _compile(PRE_NEG)
_PSEUDO_NEG_RE = _compile(PSEUDO_NEG)
# A post-negation may follow the mention after a few words ("tube and NG tube have been removed").
_POST_NEG_RE = re.compile(r"^\s*(?:[\w/-]+ ){0,4}?(?:" + "|".join(f"(?:{p})" for p in POST_NEG) + ")")
_UNCERTAIN_RE = _compile(UNCERTAIN)
_FWD_UNCERTAIN_RE = _compile(FWD_UNCERTAIN)
_HYPOTHETICAL_RE = _compile(HYPOTHETICAL)
_POORLY_SEEN_RE = _compile(POORLY_SEEN)
_ANY_MENTION_RE = _compile(tuple(p for ps in MENTIONS.values() for p in ps))
_IF_RE = re.compile(HYPOTHETICAL[0])
_SEVERITY_RE = [(re.compile(p), s) for p, s in _SEVERITY]
_ZONE_RE = [(re.compile(p), z) for p, z in _ZONES]
_SUBTYPE_RE = {o: [(re.compile(p), s) for p, s in t] for o, t in _SUBTYPES.items()}


@dataclass(frozen=True)
class Mention:
    observation: str
    status: str
    clause: str
    start: int  # span of the mention in the clause
    end: int
    weak: bool = False  # a non-visualisation hedge: loses to every other mention of the observation


def clean(text: str) -> str:
    """Lower case, one space between words, de-identification marks reduced to one word."""
    t = text.lower().replace("x-xxxx", "x-ray")
    t = re.sub(r"x{3,}", "xxxx", t)
    t = re.sub(r"(?:xxxx[ ,]*){2,}", "xxxx ", t)
    t = re.sub(r"\bvs\.", "vs", t)  # "atelectasis vs. pneumonia" is one sentence
    return re.sub(r"\s+", " ", t).strip()


def sentences(text: str) -> list[str]:
    """Sentences of cleaned text: cut at '.', ';', '?', '!' (not inside numbers like 1.5) and newlines."""
    parts = re.split(r"[.;?!](?!\d)|\n", text)
    parts = [re.sub(r"^\s*\d+\s*$|^\s*\d+[.)]\s", "", p) for p in parts]  # list numbers "1." "2)"
    return [p.strip(" ,:-") for p in parts if p.strip(" ,:-")]


def clauses(sentence: str) -> list[str]:
    """A sentence cut at words that end a negation scope; each piece keeps its breaking word."""
    cuts = [m.start() for m in _SCOPE_BREAK.finditer(sentence) if m.start() > 0]
    bounds = [0, *cuts, len(sentence)]
    return [sentence[a:b].strip() for a, b in zip(bounds, bounds[1:], strict=False) if sentence[a:b].strip()]


def _negated_before(clause: str, start: int) -> bool:
    """A pre-negation trigger before `start` whose scope reaches it (lists via commas allowed)."""
    head = clause[:start]
    triggers = list(_PRE_NEG_RE.finditer(head))
    if not triggers:
        return False
    between = head[triggers[-1].end() :]
    # "no A, large B, or C": an "or"/"nor" later in the clause shows the commas separate a list.
    if re.search(r"\b(?:or|nor)\b", clause[triggers[-1].end() :]):
        return True
    # Otherwise each comma-separated piece after the trigger must not start a new statement.
    return all(not _NEW_STATEMENT.match(piece) for piece in between.split(",")[1:])


def _mask(rx: re.Pattern, text: str) -> str:
    return rx.sub(lambda m: "_" * len(m.group()), text)


def _mask_change_negations(clause: str) -> str:
    """Mask each negation cue that denies a change rather than a finding (`_CHANGE_NOUN`,
    `_CHANGE_PARTICIPLE`): the cue, at most four words that name no finding, then the change-word."""
    out = clause
    for cue in _NEG_CUE_BEFORE_CHANGE.finditer(clause):
        words = list(re.finditer(r"[\w-]+", clause[cue.end() :]))[:5]
        for k, w in enumerate(words):
            between = clause[cue.end() : cue.end() + w.start()]
            if "," in between or re.search(r"\b(?:or|and|nor)\b", between) or _ANY_MENTION_RE.search(between):
                break
            change = _CHANGE_NOUN if cue.group() in ("no", "without", "nor") else _CHANGE_PARTICIPLE
            if change.match(w.group()) and (w.group() != "changes" or k + 1 < len(words)):
                stop = cue.end() + w.end()
                out = out[: cue.start()] + "_" * (stop - cue.start()) + out[stop:]
                break
            if _ANY_MENTION_RE.match(w.group()):
                break
    return out


def pseudo_masked(clause: str) -> str:
    """The clause with its pseudo-negations masked: NegEx's phrases (`PSEUDO_NEG`) and the negated
    changes (`_mask_change_negations`), so the finding a change is about keeps its own status."""
    return _mask_change_negations(_mask(_PSEUDO_NEG_RE, clause))


def _status(clause: str, start: int, end: int) -> tuple[str, bool]:
    """(status, weak) of the mention at clause[start:end], in the order of the CheXpert labeler's stages.

    1. Pre-negation uncertainty (CheXpert; NegEx pseudo-triggers): "cannot exclude", "not ruled
       out" are uncertainty, "no interval change in" and "not well seen" are no negation, so their
       negation words are masked first (`pseudo_masked`, `POORLY_SEEN`).
    2. Negation: a forward trigger whose scope reaches the mention (`PRE_NEG`, `_negated_before`), a
       backward one within four words after it (`POST_NEG`: "has resolved", "is unlikely"), or a
       negation word inside the mention itself ("heart is not enlarged") -> "negative".
    3. Non-visualisation ("X is not well seen") -> "uncertain", weak (see `label_report`).
    4. Post-negation uncertainty: an uncertainty trigger anywhere in the clause -> "uncertain".
    Otherwise "positive". The clause is a scope: callers cut it at scope breakers and explanations.
    """
    masked = _mask(_POORLY_SEEN_RE, pseudo_masked(_mask(_UNCERTAIN_RE, clause)))
    tail = masked[end:]
    inside = re.search(r"\b(?:not|no|without)\b", masked[start:end])  # "heart is not enlarged"
    if inside or _negated_before(masked, start) or _POST_NEG_RE.match(tail):
        return "negative", False
    if _POORLY_SEEN_RE.search(clause):
        return "uncertain", True
    hedges = pseudo_masked(clause)  # "no suspicious change in X": the hedge word is the change's
    if _UNCERTAIN_RE.search(hedges) or _FWD_UNCERTAIN_RE.search(hedges[:start]):
        return "uncertain", False
    return "positive", False


def _alternative(obs: str, blanked: str, start: int, end: int) -> bool:
    """True when the mention of `obs` at blanked[start:end] is offered as an alternative: "versus",
    "vs", "or", "and/or" or a slash within four words after it or three before it, no comma between
    (`_ALT_AFTER`, `_ALT_BEFORE`). Two names of one observation ("nodule or mass",
    "ectasia/tortuosity") are no alternatives. A slash makes alternatives of two findings of the
    vocabulary only ("atelectasis/consolidation"); "scarring/atelectasis" reads as coexisting."""
    for m in (_ALT_AFTER.match(blanked[end:]), _ALT_BEFORE.search(blanked[:start])):
        if m is None or "," in m.group():
            continue
        partner = m.group(1)
        # the mention's own modifiers apply to the partner: "aortic tortuosity or calcification"
        head = " ".join(blanked[:start].split()[-2:])
        if _MENTION_RE[obs].search(partner) or _MENTION_RE[obs].search(f"{head} {partner}"):
            continue
        slash_only = "/" in m.group() and not re.search(r"\b(?:or|vs|versus)\b", m.group())
        if slash_only and not any(rx.search(partner) for rx in _MENTION_RE.values()):
            continue
        return True
    return False


def _explanation(clause: str) -> tuple[int, str]:
    """Where the clause's explanation starts ("X may represent Y"; len(clause) if none) and the
    explanation's text (empty if none)."""
    m = _EXPLAIN_RE.search(clause)
    if m is None or m.start() == 0:
        return len(clause), ""
    return m.start(), clause[m.end() :]


def explained_away(observation: str, explanation: str) -> bool:
    """True when `explanation` (the words after "represents", "is due to", ...) names a benign
    cause of a mention of `observation`: one of its own causes (`BENIGN_CAUSES_FOR`), or a
    look-alike (`BENIGN_CAUSES`) while naming no finding of the lung or pleura. Never when the
    explanation names the observation itself ("blunting consistent with a small effusion and/or
    scarring")."""
    named = _NOT_MENTION_RE.sub(lambda m: " " * len(m.group()), explanation)
    if _MENTION_RE[observation].search(named):
        return False
    rx = _BENIGN_FOR_RE.get(observation)
    if rx is not None and rx.search(explanation):
        return True
    return bool(_BENIGN_RE.search(explanation)) and not any(_MENTION_RE[o].search(named) for o in _PULMONARY)


def mentions(text: str) -> list[Mention]:
    """Every mention of every observation in the text, with its status (see `_status`).

    In a clause with an explanation ("X is due to Y"), mentions of X are judged on the words
    before the explanation only, and dropped when Y is a benign cause; mentions of Y on the
    whole clause.
    """
    found: list[Mention] = []
    for sent in sentences(clean(text)):
        found.extend(_sentence_mentions(sent))
    return found


# Reports reuse template sentences, so a sentence's mentions are cached (a pure function of it).
@lru_cache(maxsize=1 << 16)
def _sentence_mentions(sent: str) -> tuple[Mention, ...]:
    found: list[Mention] = []
    conditional = False  # an "if" earlier in the sentence: its scope crosses "there is"
    for clause in clauses(sent):
        blanked = _NOT_MENTION_RE.sub(lambda m: " " * len(m.group()), clause)
        # the benign cause is searched in the unblanked clause: "nipple shadow" is blanked
        # as a mention look-alike but names the cause (blanking keeps the length)
        cut, explanation = _explanation(clause)
        for obs, rx in _MENTION_RE.items():
            if obs in _CONTEXT_RE and not _CONTEXT_RE[obs].search(sent):
                continue
            for m in rx.finditer(blanked):
                if conditional or _HYPOTHETICAL_RE.search(clause[: m.start()]):
                    continue  # a search or a condition, said of no patient
                if m.end() <= cut:
                    if explanation and explained_away(obs, explanation):
                        continue
                    st, weak = _status(clause[:cut], m.start(), m.end())
                else:
                    st, weak = _status(clause, m.start(), m.end())
                if st == "positive" and _alternative(obs, blanked, m.start(), m.end()):
                    st = "uncertain"
                found.append(Mention(obs, st, clause, m.start(), m.end(), weak))
        conditional = conditional or bool(_IF_RE.search(clause))
    for obs, rx in _NORMAL_RE.items():
        for m in rx.finditer(sent):
            found.append(Mention(obs, "negative", sent, m.start(), m.end()))
    for m in _NORMAL_LIST_RE.finditer(sent):
        for rx, observations in _NORMAL_SUBJECT_RE:
            if rx.search(m.group()):
                found.extend(Mention(o, "negative", sent, m.start(), m.end()) for o in observations)
    return tuple(found)


def says_normal(text: str) -> bool:
    """True when a sentence of `text` says the whole study is normal (`NORMAL_STUDY`)."""
    return any(_sentence_says_normal(s) for s in sentences(clean(text)))


@lru_cache(maxsize=1 << 16)
def _sentence_says_normal(sent: str) -> bool:
    return bool(_NORMAL_STUDY_RE.search(sent))


def laterality(text: str) -> str | None:
    if _BILATERAL.search(text) or (_LEFT.search(text) and _RIGHT.search(text)):
        return "bilateral"
    if _LEFT.search(text):
        return "left"
    return "right" if _RIGHT.search(text) else None


def zone(text: str) -> str | None:
    return next((z for rx, z in _ZONE_RE if rx.search(text)), None)


def _attributes(obs: str, clause: str) -> dict:
    attrs: dict = {}
    if obs in _LATERAL_OBS:
        attrs["laterality"] = laterality(clause)
    if obs in _SEVERITY_OBS:
        attrs["severity"] = next((s for rx, s in _SEVERITY_RE if rx.search(clause)), None)
    if obs in _ZONE_OBS:
        attrs["zone"] = zone(clause)
    if obs in _SUBTYPE_RE:
        attrs["subtype"] = next((s for rx, s in _SUBTYPE_RE[obs] if rx.search(clause)), None)
        if obs == "fracture" and attrs["subtype"] is None:
            attrs["subtype"] = "other"
        if obs == "support_devices" and attrs["subtype"] is None:
            attrs["subtype"] = "other"
    return {k: v for k, v in attrs.items() if v is not None}


def _rank(m: Mention) -> int:
    return -1 if m.weak else _STATUS_RANK[m.status]


def label_report(text: str) -> Findings:
    """Observations the text mentions, each positive / negative / uncertain with its attributes."""
    best: dict[str, Mention] = {}
    for m in mentions(text):
        cur = best.get(m.observation)
        if cur is None or _rank(m) > _rank(cur):
            best[m.observation] = m
    findings: Findings = {}
    for obs, m in best.items():
        # Severity words inside the mention ("the heart is large") name the finding, not its grade.
        # Nor do the words of a pseudo-negation ("no significant change in the small effusion").
        clause = m.clause[: m.start] + m.clause[m.start : m.end].replace("large", "") + m.clause[m.end :]
        clause = pseudo_masked(clause)
        attrs = _attributes(obs, clause) if m.status != "negative" else {}
        findings[obs] = Finding(obs, m.status, **attrs)
    abnormal = any(f.status != "negative" for o, f in findings.items() if o != "support_devices")
    if not abnormal and (findings or says_normal(text)):
        findings["no_finding"] = Finding("no_finding", "positive")
    return findings
