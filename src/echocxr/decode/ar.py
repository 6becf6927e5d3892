"""Autoregressive decoding: one token per forward over the KV cache (the Stage-1 baseline).

The engine has prefilled the prompt (images + instruction); the first token comes from the
prefill's last logits, each later token from one forward over the previous token (the engine's
`Step` with block size 1: plain causal attention). Rows of a batch have ragged prompt lengths
(left padding, hidden by `key_valid`) but share the cache length, so all rows step together. A
finished row is fed EOS until every row is done (`Run.commit`); the engine leaves it out of the
forwards (`Run.forward`). tests/test_ar.py checks this
against transformers' generate and an uncached loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from echocxr.decode.engine import Run


def decode(run: Run) -> dict:
    """Decode until every row has its EOS or its max; returns stats for Output.stats."""
    tok = run.commit(run.pick(run.first)[0][:, None])  # [rows, 1]
    while not run.all_done:
        h = run.forward(tok, run.committed - 1, block=1)  # the last token, at its own position
        run.cache.commit(1)
        tok = run.commit(run.pick(run.model.logits(h[:, -1]))[0][:, None])
    return {"steps": run.committed}
