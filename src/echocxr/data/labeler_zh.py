"""Rule-based labeler for Chinese report text: the same observations and statuses as `labeler`.

Chinese reports from real archives and from LLM translations are read directly (our own renderer's
sentences too; `zh.zh_to_en` only inverts those). docs/LABELER.md section 6 states the rules:

1. NFKC normalisation: full-width punctuation, digits and letters become half-width (４ｃｍ -> 4cm,
   ， -> ,).
2. Sentences end at 。 ; ! ? and newlines; clauses at commas, 、-free punctuation and turning words
   (但, 但是, 然而, 而, 惟): a negation or hedge reaches no further than its clause.
3. Mentions: each observation has a table of Chinese terms (`MENTIONS_ZH`).
4. Status, in the English labeler's order: hedges that contain a negation (不除外, 不能排除) and
   negated changes (较前无明显变化, 无明显增加: the finding stays present) are masked first; then
   negation (`PRE_NEG_ZH` before the mention in its clause: 未见, 无, 未, 没有, 排除; a negation
   inside the mention: 心影不大; `POST_NEG_ZH` after it: 已吸收, 已拔除); then uncertainty
   (`UNCERTAIN_ZH` in the clause: 考虑, 可能, 不除外, 疑似, 待排, 鉴别; 或 and / between two
   observations); otherwise positive.
5. One status per observation, positive > uncertain > negative; `no_finding` as in `labeler`.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

from echocxr.data.observations import Finding, Findings

_STOP = r"[^,;。]"  # any character inside a clause
MENTIONS_ZH: dict[str, tuple[str, ...]] = {
    "cardiomegaly": (
        rf"心(?:影|脏|胸比){_STOP}{{0,6}}?(?:增大|扩大|大(?!小))",
        r"普大型|心脏扩大",
    ),
    "enlarged_cardiomediastinum": (rf"纵隔{_STOP}{{0,4}}?(?:增宽|宽|扩大)",),
    "lung_opacity": (
        r"斑片(?:状)?(?:影|阴影|高密度影|模糊影)?|斑点状(?!钙化)影",
        r"片状(?!实变)(?:模糊|高密度|密度增高|淡)?影|淡片状(?:阴)?影",
        r"(?<!钙化)阴影|密度增高影|高密度影|模糊影|异常密度影|磨玻璃|渗出(?:性)?(?:病变|影)?",
        r"透亮度(?:减低|降低)|实质性病[变灶]",
    ),
    "lung_lesion": (r"(?<!钙化)(?<!钙化性)结节|肿块|团块|占位|肿瘤|肺癌|癌|转移(?:瘤|灶)?|恶性",),
    "edema": (
        r"水肿|淤血|瘀血|充血|心力衰竭|心衰|蝶翼",
        r"肺血管(?:影|纹理)?(?:增粗|增多|模糊)",
    ),
    "consolidation": (r"实变|浸润",),
    "pneumonia": (r"肺炎|炎症|炎性|感染",),
    "atelectasis": (r"不张|膨胀不全",),
    "pneumothorax": (r"气胸",),
    "pleural_effusion": (
        r"(?<!心包)积液|胸水",
        r"肋膈角(?:变钝|稍钝|钝|消失|模糊)",
    ),
    "pleural_other": (r"胸膜(?:增厚|肥厚|粘连|钙化|斑块)|胸膜帽",),
    "fracture": (r"骨折",),
    "support_devices": (
        r"起搏器|除颤器|导线|导管|置管|插管|胃管|引流管|营养管|鼻饲管|picc|中心静脉|支架|装置|气管切开",
        rf"人工{_STOP}{{0,4}}瓣膜|瓣膜置换",
    ),
    "calcified_granuloma": (r"肉芽肿|钙化(?:灶|结节|影)|淋巴结钙化|钙化(?:的)?淋巴结",),
    "hyperinflation": (
        r"肺气肿|过度充气|过度膨胀|透亮度增高|膈(?:肌|面)?低平|慢性阻塞性肺|慢阻肺|copd|肺大疱",
    ),
    "sternotomy": (r"胸骨(?:正中)?切开|胸骨(?:固定)?钢丝|搭桥|cabg|胸骨术后",),
    "hiatal_hernia": (r"裂孔疝",),
    "scoliosis": (r"侧弯|侧凸",),
    "degenerative_spine": (
        r"骨质增生|退行性(?:变|改变)|退变|骨赘|骨刺|(?:边缘|缘)(?:骨质)?(?:变尖|增生)|唇样变",
    ),
    "aortic_abnormality": (
        rf"主动脉{_STOP}{{0,4}}?(?:迂曲|钙化|硬化|扩张|突出|粥样)",
        r"动脉(?:粥样)?硬化",
    ),
}
# A mention counts only when its sentence also names the place (as `labeler._CONTEXT`).
_CONTEXT_ZH: dict[str, str] = {
    "degenerative_spine": r"椎|脊柱|脊椎",
    "calcified_granuloma": r"肺|叶|淋巴结|纵隔|肉芽肿",
}
# Statements that deny an observation without a negation word in front of its mention.
NORMAL_ZH: dict[str, tuple[str, ...]] = {
    "cardiomegaly": (
        r"心(?:影|脏)(?:大小)?(?:、?形态)?(?:大小)?(?:及|和)?(?:形态)?(?:正常|未见异常|在正常范围)",
        r"心脏轮廓正常|心影(?:大小)?(?:形态)?正常",
    ),
    "enlarged_cardiomediastinum": (r"纵隔(?:轮廓|影)?(?:正常|未见异常)",),
    "pleural_effusion": (r"肋膈角(?:锐利|清晰|清楚)",),
    "lung_opacity": (r"肺野?(?:清晰|清楚)(?!纹理)",),
    "consolidation": (r"肺野?(?:清晰|清楚)(?!纹理)",),
    "edema": (r"肺血管纹理正常",),
}
NORMAL_STUDY_ZH = (
    r"(?:心肺膈|心肺|心、肺|胸部|双肺|两肺)未见(?:明显|明确)?(?:急性)?异常",
    r"无急性心肺(?:疾病|异常)",
)
# Hedges with a negation word inside, and negated changes: masked before the negation search.
PSEUDO_NEG_ZH = (
    r"不(?:能)?除外|未除外|待除外|不能排除|不排除",
    r"(?:较前|与前片比较|与前比较)?(?:无|未见|未|没有)(?:明显|显著|明确)?(?:变化|改变|增加|增多|加重|增大|减少|"
    r"进展|好转|缩小|变)",
)
PRE_NEG_ZH = (r"未见|未发现|未显示|未|无|没有|排除|不伴|否认",)
POST_NEG_ZH = (r"已(?:完全)?(?:吸收|消失|拔除|撤除|移除|去除|取出)|完全吸收",)
UNCERTAIN_ZH = (r"考虑|可能|不除外|不能除外|不能排除|不排除|未除外|待除外|疑|待排|待查|鉴别|似|倾向|\?",)
_SCOPE_BREAK_ZH = re.compile(r"但是|但|然而|而|惟|唯")
_HAN = re.compile(r"[\u4e00-\u9fff]")

_STATUS_RANK = {"negative": 0, "uncertain": 1, "positive": 2}


def _compile(patterns: tuple[str, ...]) -> re.Pattern:
    return re.compile("|".join(f"(?:{p})" for p in patterns))


_MENTION_RE = {o: _compile(p) for o, p in MENTIONS_ZH.items()}
_CONTEXT_RE = {o: re.compile(p) for o, p in _CONTEXT_ZH.items()}
_NORMAL_RE = {o: _compile(p) for o, p in NORMAL_ZH.items()}
_NORMAL_STUDY_RE = _compile(NORMAL_STUDY_ZH)
_PSEUDO_RE = _compile(PSEUDO_NEG_ZH)
_PRE_NEG_RE = _compile(PRE_NEG_ZH)
_POST_NEG_RE = _compile(POST_NEG_ZH)
_UNCERTAIN_RE = _compile(UNCERTAIN_ZH)
_INSIDE_NEG_RE = re.compile(r"不|未|无|没有")
# Mentions with a gap a negation can sit in (心影不大, 纵隔未见增宽); 肺不张's 不 is no negation.
_GAPPED = ("cardiomegaly", "enlarged_cardiomediastinum", "aortic_abnormality")


def has_chinese(text: str) -> bool:
    return bool(_HAN.search(text))


def normalize_zh(text: str) -> str:
    """NFKC (full-width punctuation, digits and letters to half-width), lower case, no spaces."""
    return re.sub(r"\s+", "", unicodedata.normalize("NFKC", text).lower())


def sentences_zh(text: str) -> list[str]:
    """Sentences of a Chinese text: cut at 。 ; ! ? and newlines (before normalisation)."""
    parts = re.split(r"[。;!?！？；\n]", unicodedata.normalize("NFKC", text))
    return [normalize_zh(p) for p in parts if normalize_zh(p).strip(",、:")]


def _clauses(sentence: str) -> list[str]:
    out = []
    for piece in sentence.split(","):
        cuts = [m.start() for m in _SCOPE_BREAK_ZH.finditer(piece) if m.start() > 0]
        bounds = [0, *cuts, len(piece)]
        out.extend(piece[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if piece[a:b])
    return out


def _mask(rx: re.Pattern, text: str) -> str:
    return rx.sub(lambda m: "_" * len(m.group()), text)


@lru_cache(maxsize=1 << 16)
def _sentence_statuses(sent: str) -> tuple[tuple[str, str], ...]:
    """(observation, status) of every mention in one normalised sentence."""
    found: list[tuple[str, str]] = []
    for clause in _clauses(sent):
        masked = _mask(_PSEUDO_RE, clause)
        hits = []
        for obs, rx in _MENTION_RE.items():
            if obs in _CONTEXT_RE and not _CONTEXT_RE[obs].search(sent):
                continue
            hits.extend((obs, m) for m in rx.finditer(clause))
        # 或 or / between two observations offers alternatives; within one ("结节或肿块") it does not
        alternatives = bool(re.search(r"或|/", clause)) and len({o for o, _ in hits}) > 1
        for obs, m in hits:
            if (
                (obs in _GAPPED and _INSIDE_NEG_RE.search(clause[m.start() : m.end()]))  # 心影不大
                or _PRE_NEG_RE.search(masked[: m.start()])
                or _POST_NEG_RE.search(masked[m.end() :])
            ):
                status = "negative"
            elif _UNCERTAIN_RE.search(clause) or alternatives:
                status = "uncertain"
            else:
                status = "positive"
            found.append((obs, status))
    for obs, rx in _NORMAL_RE.items():
        if rx.search(sent):
            found.append((obs, "negative"))
    return tuple(found)


def label_report_zh(text: str) -> Findings:
    """Observations a Chinese text mentions, each positive / negative / uncertain (no attributes).

    Sentences without Chinese characters go to the English labeler (`labeler.mentions`), so text
    that mixes both (a `zh_to_en` translation with sentences it did not know) is read whole.
    """
    from echocxr.data.labeler import label_report

    best: dict[str, str] = {}
    normal = False
    english: list[str] = []
    for raw in re.split(r"(?<=[。；;!?！？\n])|(?<=[.])\s+", text):
        if not has_chinese(raw):
            english.append(raw)
            continue
        for sent in sentences_zh(raw):
            normal = normal or bool(_NORMAL_STUDY_RE.search(sent))
            for obs, status in _sentence_statuses(sent):
                if obs not in best or _STATUS_RANK[status] > _STATUS_RANK[best[obs]]:
                    best[obs] = status
    findings: Findings = {o: Finding(o, s) for o, s in best.items()}
    if "".join(english).strip():
        en = label_report(" ".join(english))
        normal = normal or "no_finding" in en
        for obs, f in en.items():
            if obs != "no_finding" and (
                obs not in findings or _STATUS_RANK[f.status] > _STATUS_RANK[findings[obs].status]
            ):
                findings[obs] = f
    abnormal = any(
        f.status != "negative" for o, f in findings.items() if o not in ("support_devices", "no_finding")
    )
    if not abnormal and (findings or normal):
        findings["no_finding"] = Finding("no_finding", "positive")
    return findings


def label_text(text: str) -> Findings:
    """`labeler.label_report` for English text, `label_report_zh` for text with Chinese in it."""
    if has_chinese(text):
        return label_report_zh(text)
    from echocxr.data.labeler import label_report

    return label_report(text)
