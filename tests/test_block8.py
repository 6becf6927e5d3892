"""Block 8: the confidence_dynamic unmasking rule (decode.block.choose) after the diagnosis in
docs/RAD.md, "Block 8". Before the fix, a step in which no position cleared the threshold
committed the block's most confident position wherever it was, so a filler token far to the right
whose marginal pools several report templates was committed first and chose the template."""

import itertools

import pytest
import torch

from echocxr.decode.block import WINDOW, choose


def test_low_confidence_step_commits_near_the_left_frontier():
    # First steps of a block-8 teacher on a held-out phantom (docs/RAD.md, "Block 8"):
    # "Findings:" committed at positions 0-1; then " the" at position 5 (0.35) was the most
    # confident, and the block became "Findings: Lung opacity in the right lower".
    conf = torch.tensor([[1.0, 1.0, 0.30, 0.28, 0.25, 0.35, 0.33, 0.32]])
    masked = torch.tensor([[False, False, True, True, True, True, True, True]])
    pick = choose(conf, masked, steps_left=7, strategy="confidence_dynamic", threshold=0.85)
    assert pick.tolist() == [[False, False, True, False, False, False, False, False]]


def _mixture():
    """An exact distribution over 8-token blocks: a normal template with probability 0.4 and three
    abnormal ones with 0.2 each that share their last six tokens (" in the right lower lung ."
    after a finding word), so the shared tokens have marginal 0.6 and the first words 0.4."""
    normal = [10, 11, 12, 13, 14, 15, 16, 17]
    shared = [20, 21, 22, 23, 24, 25]
    abnormal = [[30 + i, 40 + i, *shared] for i in range(3)]
    return [(0.4, normal)] + [(0.2, a) for a in abnormal]


def _denoise_exactly(steps: int, threshold: float = 0.85) -> list[int]:
    """Greedy block denoising with the mixture's exact conditionals p(x_j | committed tokens) and
    model.denoise.choose, the rule of the block loop (model.denoise.denoise_blocks) for one row and
    one block."""
    mix, B = _mixture(), 8
    ids, masked = [None] * B, torch.ones(1, B, dtype=torch.bool)
    for s in range(steps):
        if not bool(masked.any()):
            break
        live = [(p, t) for p, t in mix if all(c is None or c == x for c, x in zip(ids, t))]
        total = sum(p for p, _ in live)
        tokens, conf = [], []
        for j in range(B):
            mass: dict[int, float] = {}
            for p, t in live:
                mass[t[j]] = mass.get(t[j], 0.0) + p / total
            best = max(sorted(mass), key=lambda k: mass[k])
            tokens.append(best)
            conf.append(mass[best])
        pick = choose(torch.tensor([conf]), masked, steps - s, "confidence_dynamic", threshold)
        for j in pick[0].nonzero().flatten().tolist():
            ids[j] = tokens[j]
        masked &= ~pick
    return ids


def test_k_equals_b_finds_the_mode_of_a_pooled_mixture():
    # The joint mode is the normal template (0.4). Committing the most confident position first
    # (a shared token, 0.6) would select an abnormal template (0.2): the block-8 failure.
    mode = _mixture()[0][1]
    assert _denoise_exactly(steps=8) == mode
    # The window is a limit, not a guarantee: at K = 4 a step commits n = 2 of the 4 leftmost
    # positions, which here include two shared tokens, and the block becomes abnormal template 0.
    assert _denoise_exactly(steps=4) == _mixture()[1][1]


@pytest.mark.parametrize("steps_left", [1, 2, 3, 8])
def test_dynamic_rule_matches_its_definition(steps_left):
    """Every masked position above the threshold is committed; besides those, the count is the
    scheduled ceil(m / steps_left), taken most confident first among the WINDOW * n leftmost
    masked positions."""
    g = torch.Generator().manual_seed(steps_left)
    B, threshold = 8, 0.85
    conf = torch.rand(256, B, generator=g) ** 0.5
    masked = torch.rand(256, B, generator=g) < 0.7
    pick = choose(conf, masked, steps_left, "confidence_dynamic", threshold)
    for c, m, p in zip(conf.tolist(), masked.tolist(), pick.tolist()):
        where = [j for j in range(B) if m[j]]
        above = {j for j in where if c[j] > threshold}
        n = -(-len(where) // steps_left)
        window = where[: WINDOW * n]
        rest = sorted((j for j in window if j not in above), key=lambda j: -c[j])
        want = above | set(rest[: max(n - len(above), 0)])
        assert {j for j in range(B) if p[j]} == want


def test_dynamic_rule_finishes_every_block_within_k_steps():
    for B, K in itertools.product((4, 8, 16), (1, 2, 3, 8)):
        if K > B:
            continue
        g = torch.Generator().manual_seed(B * 31 + K)
        masked = torch.ones(32, B, dtype=torch.bool)
        for s in range(K):
            conf = torch.rand(32, B, generator=g)
            masked &= ~choose(conf, masked, K - s, "confidence_dynamic", 0.85)
        assert not bool(masked.any()), (B, K)
