"""RadGraph F1 (Delbrouck et al., 2022: simple / partial / complete rewards) through the radgraph package.

The package downloads its model unless the extracted archive already sits in `model_cache_dir`;
ECHOCXR_RADGRAPH_DIR names that folder (holding `radgraph/config.json` and its weights).
"""

from __future__ import annotations

import functools
import os

from echocxr.errors import UserError
from echocxr.eval.metrics import MetricResult

_LEVELS = ("simple", "partial", "complete")


@functools.lru_cache(maxsize=1)
def _scorer(radgraph_dir: str, batch_size: int, device: str):
    if not os.path.isfile(os.path.join(radgraph_dir, "radgraph", "config.json")):
        raise UserError(f"{radgraph_dir}: expected the extracted model in radgraph/ (radgraph/config.json)")
    import torch
    from radgraph import F1RadGraph

    cuda = -1  # the package's spelling of "cpu"
    if device.startswith("cuda"):
        cuda = torch.device(device).index or 0
    return F1RadGraph(
        reward_level="all",
        model_type="radgraph",
        model_cache_dir=radgraph_dir,
        batch_size=batch_size,
        cuda=cuda,
    )


def radgraph_f1(
    hyps: list[str], refs: list[str], *, radgraph_dir: str, batch_size: int = 1, device: str = "cpu"
) -> MetricResult:
    _, rewards, _, _ = _scorer(radgraph_dir, batch_size, device)(refs=refs, hyps=hyps)
    per_sample = [{f"radgraph_f1_{lvl}": float(v) for lvl, v in zip(_LEVELS, r)} for r in rewards]
    aggregate = {k: sum(d[k] for d in per_sample) / len(per_sample) for k in per_sample[0]}
    return MetricResult(aggregate, per_sample, f"radgraph package, model in {radgraph_dir}")
