"""Issue 14, item 11 on the real IU archive: the normalized EN target and its Chinese copy (read
back with zh_to_en) carry the source report's labels. This is the check `echocxr data build`
runs on every study, here on every report of the archive with a non-empty normalized target
(no dedup, no MiniLM: labeler + normalizer + Chinese renderer only)."""

from __future__ import annotations

from echocxr.data.build import check_target
from echocxr.data.labeler import label_report
from echocxr.data.labeler_validate import read_iu_archive
from echocxr.data.normalize import normalize_report
from echocxr.data.zh import render_zh

MAX_FLIP_RATE = 0.01  # the target: under 1% of studies; measured 0.0% on 2026-11-30


def test_iu_archive_targets_keep_the_source_labels(iu_archive):
    studies = changed = zh_checked = 0
    examples = []
    for rep in read_iu_archive(iu_archive):
        labels = label_report(f"{rep.findings}\n{rep.impression}")
        norm = normalize_report(rep.findings, rep.impression, labels)
        if not norm["findings"] or not norm["impression"]:
            continue  # nothing readable: the build drops it
        studies += 1
        changes = check_target(labels, norm, "en")
        zh = render_zh(norm, labels)
        if zh is not None:
            zh_checked += 1
            changes += check_target(labels, zh, "zh")
        if changes:
            changed += 1
            examples.append((rep.study_id, changes))
    assert studies > 3400 and zh_checked > 0.9 * studies
    assert changed / studies < MAX_FLIP_RATE, examples[:10]
