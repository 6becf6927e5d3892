"""Chinese rendering of normalized reports, and the deterministic way back to English.

`render_zh` translates a normalized report sentence by sentence. A sentence is translated only when
it is one the normalizer writes from a structured finding (checked by writing it again from its
labels: the English must come out identical), a negative template, or a sentence of the phrase
table; anything else makes the whole report untranslatable (None), so no mixed English/Chinese
text is ever produced. Terms follow standard Chinese radiology usage (气胸, 胸腔积液, 心影增大,
肺不张, 实变, ...).

`zh_to_en` inverts the rendering exactly: every Chinese sentence the renderer can write maps back to
its English sentence. Sentences it does not know (free model output) are kept as they are and
listed by `zh_to_en_detailed`.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import replace
from functools import lru_cache

from echocxr.data.labeler import label_report
from echocxr.data.normalize import (
    NEGATIVE_SENTENCES,
    NO_ACUTE,
    finding_sentence,
    healed_sentence,
    located_sentence,
)
from echocxr.data.observations import LATERALITIES, SEVERITIES, SUBTYPES, ZONES, Finding, Findings

_LAT = {"left": "左", "right": "右", "bilateral": "双"}
_LAT_SIDE = {"left": "左侧", "right": "右侧", "bilateral": "双侧"}
_ZONE = {"upper": "上", "middle": "中", "lower": "下"}
_SEV = {"mild": "轻度", "moderate": "中度", "severe": "重度"}
_SIZE = {"mild": "少量", "moderate": "中等量", "severe": "大量"}
_HERNIA_SIZE = {"mild": "小型", "moderate": "中等大小", "severe": "大型"}

NEGATIVE_ZH: dict[str, str] = {
    "enlarged_cardiomediastinum": "未见纵隔增宽。",
    "cardiomegaly": "未见心影增大。",
    "lung_opacity": "未见局灶性肺部阴影。",
    "lung_lesion": "未见肺结节或肿块。",
    "edema": "未见肺水肿。",
    "consolidation": "未见局灶性实变。",
    "pneumonia": "未见肺炎。",
    "atelectasis": "未见肺不张。",
    "pneumothorax": "未见气胸。",
    "pleural_effusion": "未见胸腔积液。",
    "pleural_other": "未见胸膜增厚。",
    "fracture": "未见急性骨折。",
    "support_devices": "未见支持装置。",
    "calcified_granuloma": "未见钙化肉芽肿。",
    "hyperinflation": "未见肺过度充气。",
    "sternotomy": "未见胸骨正中切开术后改变。",
    "hiatal_hernia": "未见食管裂孔疝。",
    "scoliosis": "未见脊柱侧弯。",
    "degenerative_spine": "未见脊柱退行性变。",
    "aortic_abnormality": "未见主动脉迂曲或钙化。",
}

# English sentence (as the normalizer writes it) -> Chinese.
PHRASES: dict[str, str] = {
    NO_ACUTE: "心肺未见急性异常。",
    "The osseous structures are intact.": "骨性结构完整。",
    "No acute osseous abnormality.": "未见急性骨质异常。",
    "The trachea is midline.": "气管居中。",
    "The pulmonary vascularity is normal.": "肺血管纹理正常。",
    "The upper abdomen is unremarkable.": "上腹部未见异常。",
    "No free air under the diaphragm.": "膈下未见游离气体。",
    "Low lung volumes.": "肺容积减低。",
    "Low lung volumes with bronchovascular crowding.": "肺容积减低，支气管血管影聚拢。",
    "Elevated left hemidiaphragm.": "左侧膈肌抬高。",
    "Elevated right hemidiaphragm.": "右侧膈肌抬高。",
    "Eventration of the left hemidiaphragm.": "左侧膈膨升。",
    "Eventration of the right hemidiaphragm.": "右侧膈膨升。",
    "The heart size is at the upper limit of normal.": "心影大小处于正常上限。",
    "Surgical clips in the upper abdomen.": "上腹部可见手术夹。",
    "Pectus carinatum.": "鸡胸。",
    "Pectus excavatum.": "漏斗胸。",
    "Osteopenia.": "骨质减少。",
    "Vascular calcification.": "血管钙化。",
    "Arthritic changes of the skeletal structures.": "骨关节退行性改变。",
    "Kyphosis.": "脊柱后凸。",
    "Surgical clips are present.": "可见手术夹。",
    "Postsurgical changes.": "术后改变。",
    "Radiopaque foreign body.": "可见高密度异物影。",
    "Nipple shadows.": "乳头影。",
    "Degenerative joint disease.": "关节退行性变。",
    "Prominent hila.": "肺门影增浓。",
    "Prominent central pulmonary arteries.": "中央肺动脉增粗。",
    "Chronic interstitial lung disease.": "慢性间质性肺疾病。",
    "Clinical correlation is recommended.": "建议结合临床。",
    "Further evaluation with CT is recommended.": "建议行CT进一步检查。",
    "Follow-up imaging is recommended.": "建议影像学随访。",
    "Old rib deformity.": "陈旧性肋骨畸形。",
    "Vertebral body deformity.": "椎体变形。",
    "Postsurgical changes of the spine.": "脊柱术后改变。",
    "Prosthetic or calcified cardiac valve.": "人工或钙化心脏瓣膜。",
    "Prosthesis.": "可见假体。",
    "Prominent epicardial fat.": "心外膜脂肪垫显著。",
    "Pericardial effusion.": "心包积液。",
    "Lymphadenopathy.": "淋巴结肿大。",
    "Azygos fissure.": "奇裂。",
    "Free air under the diaphragm.": "膈下游离气体。",
    "Bronchial wall thickening.": "支气管壁增厚。",
    "Prominent pulmonary vasculature.": "肺血管影增粗。",
    "Increased interstitial markings.": "肺间质纹理增多。",
    "Degenerative changes.": "退行性改变。",
    "Scattered calcifications.": "散在钙化灶。",
    "Bronchovascular crowding.": "支气管血管影聚拢。",
    "Prominent mediastinal contour.": "纵隔轮廓突出。",
}

_DEVICE = {
    "pacemaker": "心脏起搏器或除颤器置入",
    "central_line": "中心静脉导管置入",
    "endotracheal_tube": "气管插管置入",
    "ng_tube": "肠内营养管置入",
    "chest_tube": "胸腔引流管置入",
    "other": "医疗装置置入",
}
_FRACTURE = {"rib": "肋骨骨折", "clavicle": "锁骨骨折", "spine": "椎体骨折", "other": "骨折"}


def _loc(f: Finding) -> str:
    """Where in the lungs: 左下肺, 双肺, 下肺, or '' when not stated."""
    if not f.laterality and not f.zone:
        return ""
    return (_LAT[f.laterality] if f.laterality else "") + (_ZONE[f.zone] if f.zone else "") + "肺"


# Out-of-vocabulary findings the normalizer writes with a location: noun -> (after a place, alone).
_LOCATED_ZH = {"scarring": ("瘢痕", "肺部瘢痕"), "volume loss": ("体积缩小", "肺体积缩小")}


def _located_phrases() -> dict[str, str]:
    out = {}
    for noun, (zh, zh_alone) in _LOCATED_ZH.items():
        for lat, zone in itertools.product((None, *LATERALITIES), (None, *ZONES)):
            where = _loc(Finding("lung_opacity", "positive", lat, None, zone))
            out[located_sentence(noun, lat, zone)] = (where + zh if where else zh_alone) + "。"
    return out


PHRASES.update(_located_phrases())


def _hedged_phrases() -> dict[str, str]:
    """ "Possible pericardial effusion." for the phrases that state a finding (the normalizer hedges them)."""
    return {
        "Possible " + en[0].lower() + en[1:]: "可能" + zh
        for en, zh in PHRASES.items()
        if not en.startswith(("No ", "The ", "Possible ")) and "recommended" not in en
    }


PHRASES.update(_hedged_phrases())


def finding_zh(f: Finding) -> str:
    """The Chinese sentence for one positive or uncertain finding (mirrors `finding_sentence`)."""
    o = f.observation
    sev = _SEV[f.severity] if f.severity else ""
    size = _SIZE[f.severity] if f.severity else ""
    side = _LAT_SIDE[f.laterality] if f.laterality else ""
    if o == "cardiomegaly":
        s = f"{sev}心影增大"
    elif o == "enlarged_cardiomediastinum":
        s = f"心纵隔影{sev}增宽"
    elif o == "lung_opacity":
        s = f"{_loc(f) or '肺内'}{sev}密度增高影"
    elif o == "lung_lesion":
        kind = {"nodule": "结节", "mass": "肿块"}.get(f.subtype or "", "结节或肿块")
        s = f"{_loc(f) or '肺'}{kind}"
    elif o == "edema":
        s = f"{sev}{'肺血管淤血' if f.subtype == 'vascular_congestion' else '肺水肿'}"
    elif o == "consolidation":
        s = f"{_loc(f) or '肺'}{sev}实变"
    elif o == "pneumonia":
        s = f"{_loc(f)}肺炎"
    elif o == "atelectasis":
        kind = {"linear": "线状", "lobar": "大叶性"}.get(f.subtype or "", "")
        s = f"{_loc(f)}{sev}{kind}肺不张"
    elif o == "pneumothorax":
        s = f"{side}{size}气胸"
    elif o == "pleural_effusion":
        s = f"{side}{size}胸腔积液"
    elif o == "pleural_other":
        s = f"{side}{sev}胸膜增厚"
    elif o == "fracture":
        s = f"{side}{_FRACTURE.get(f.subtype or 'other', '骨折')}"
    elif o == "support_devices":
        s = _DEVICE.get(f.subtype or "other", _DEVICE["other"])
    elif o == "calcified_granuloma":
        s = f"{_loc(f)}钙化肉芽肿"
    elif o == "hyperinflation":
        s = f"{sev}肺过度充气"
    elif o == "sternotomy":
        s = "胸骨正中切开术后"
    elif o == "hiatal_hernia":
        s = f"{_HERNIA_SIZE[f.severity] if f.severity else ''}食管裂孔疝"
    elif o == "scoliosis":
        s = f"{sev}脊柱侧弯"
    elif o == "degenerative_spine":
        s = f"{sev}脊柱退行性变"
    elif o == "aortic_abnormality":
        s = {"tortuous": "主动脉迂曲", "calcified": "主动脉钙化"}.get(f.subtype or "", "主动脉迂曲或钙化")
    else:
        raise ValueError(f"no Chinese sentence for observation {o!r}")
    return ("可能" if f.status == "uncertain" else "") + s + "。"


_ATTRS = ("laterality", "severity", "zone", "subtype")


def _structured(sentence: str) -> Finding | None:
    """The finding this English sentence was written from, when the normalizer wrote it."""
    for f in label_report(sentence).values():
        if f.observation == "no_finding" or f.status == "negative":
            continue
        # The labeler may read an attribute the template did not write; try dropping some.
        for drop in itertools.chain.from_iterable(itertools.combinations(_ATTRS, k) for k in range(5)):
            g = replace(f, **{a: None for a in drop})
            if finding_sentence(g) == sentence:
                return g
    return None


_NEGATIVE_EN_TO_ZH = {NEGATIVE_SENTENCES[o]: NEGATIVE_ZH[o] for o in NEGATIVE_SENTENCES}


def _split_en(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.?!])\s+", text.strip()) if s.strip()]


def sentence_zh(sentence: str) -> str | None:
    if sentence in PHRASES:
        return PHRASES[sentence]
    if sentence in _NEGATIVE_EN_TO_ZH:
        return _NEGATIVE_EN_TO_ZH[sentence]
    if sentence.startswith("Healed "):
        rest = sentence[len("Healed ") :]
        f = _structured(rest[0].upper() + rest[1:])
        ok = f is not None and f.observation == "fracture" and f.status == "positive"
        return "陈旧性" + finding_zh(f) if ok else None
    f = _structured(sentence)
    return finding_zh(f) if f is not None else None


def render_zh(normalized: dict, labels: Findings) -> dict | None:
    """Chinese `{"findings", "impression"}` of a normalized report, or None if any sentence is unknown.

    `labels` guards faithfulness: a structured sentence whose status disagrees with the study's
    label (a positive sentence for an observation labeled negative) is refused.
    """
    out = {}
    for key in ("findings", "impression"):
        parts = []
        for sentence in _split_en(normalized.get(key) or ""):
            zh = sentence_zh(sentence)
            if zh is None:
                return None
            f = _structured(sentence)
            if f is not None and f.observation in labels and labels[f.observation].status == "negative":
                return None
            parts.append(zh)
        out[key] = "".join(parts)
    return out if any(out.values()) else None  # nothing to translate


# --------------------------------------------------------------------------------------------
# Back to English.

_OPTIONS: dict[str, tuple[str, ...]] = {
    "laterality": (None, *LATERALITIES),
    "severity": (None, *SEVERITIES),
    "zone": (None, *ZONES),
}


@lru_cache(maxsize=1)
def _zh_index() -> dict[str, str]:
    """Every Chinese sentence the renderer can write -> its English sentence."""
    index: dict[str, str] = {}
    for en, zh in PHRASES.items():
        if index.setdefault(zh, en) != en:
            raise AssertionError(f"two English phrases render as {zh}")
    for en, zh in _NEGATIVE_EN_TO_ZH.items():
        index[zh] = en
    from echocxr.data.observations import OBSERVATIONS

    for o in OBSERVATIONS:
        if o == "no_finding":
            continue
        subtypes = (None, *SUBTYPES.get(o, ()))
        for status, lat, sev, zone, sub in itertools.product(
            ("positive", "uncertain"),
            _OPTIONS["laterality"],
            _OPTIONS["severity"],
            _OPTIONS["zone"],
            subtypes,
        ):
            f = Finding(o, status, lat, sev, zone, sub)
            pairs = [(finding_zh(f), finding_sentence(f))]
            if o == "fracture" and status == "positive":
                pairs.append(("陈旧性" + finding_zh(f), healed_sentence(f)))
            for zh, en in pairs:
                if index.setdefault(zh, en) != en:
                    raise AssertionError(f"{index[zh]!r} and {en!r} both render as {zh}")
    return index


_HEADERS = {"所见：": "Findings:", "印象：": "Impression:"}


def zh_to_en_detailed(text: str) -> tuple[str, list[str]]:
    """English for Chinese text the renderer writes; unknown sentences kept as they are and listed."""
    index = _zh_index()
    unknown: list[str] = []
    lines = []
    for line in text.splitlines():
        head = ""
        for zh_head, en_head in _HEADERS.items():
            if line.startswith(zh_head):
                head, line = en_head + " ", line[len(zh_head) :]
        parts = []
        for sent in re.findall(r"[^。]+。?", line):
            sent = sent.strip()
            if not sent:
                continue
            key = sent if sent.endswith("。") else sent + "。"
            if key in index:
                parts.append(index[key])
            else:
                unknown.append(sent)
                parts.append(sent)
        lines.append(head + " ".join(parts))
    return "\n".join(lines).strip(), unknown


def zh_to_en(text: str) -> str:
    """Deterministic English for Chinese text written by `render_zh` (unknown spans kept)."""
    return zh_to_en_detailed(text)[0]
