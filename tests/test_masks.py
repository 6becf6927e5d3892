"""Attention masks against brute-force loops written from the English rules (ECHO Sec. 3.2,
bd3lms), and the FlexAttention block mask against the dense one."""

import itertools

import pytest
import torch

from echocxr.model import masks


def brute_rad(P: int, R: int, B: int) -> torch.Tensor:
    """[prefix P | noisy R | clean R]. Prefix: causal. Noisy block i: the whole prefix, clean
    blocks before i, itself (both ways). Clean block i: the prefix, clean blocks up to i."""
    S = P + 2 * R
    m = torch.zeros(S, S, dtype=torch.bool)
    for q in range(S):
        for k in range(S):
            if q < P:
                region_q, block_q = "prefix", None
            elif q < P + R:
                region_q, block_q = "noisy", (q - P) // B
            else:
                region_q, block_q = "clean", (q - P - R) // B
            if k < P:
                region_k, block_k = "prefix", None
            elif k < P + R:
                region_k, block_k = "noisy", (k - P) // B
            else:
                region_k, block_k = "clean", (k - P - R) // B
            if region_q == "prefix":
                ok = region_k == "prefix" and k <= q
            elif region_q == "noisy":
                if region_k == "prefix":
                    ok = True
                elif region_k == "noisy":
                    ok = block_k == block_q
                else:
                    ok = block_k < block_q
            else:
                if region_k == "prefix":
                    ok = True
                elif region_k == "noisy":
                    ok = False
                else:
                    ok = block_k <= block_q
            m[q, k] = ok
    return m


def brute_symmetric(L: int, B: int) -> torch.Tensor:
    """[noisy L | clean L], everything duplicated: noisy block i sees itself and clean blocks < i;
    clean block i sees clean blocks <= i."""
    m = torch.zeros(2 * L, 2 * L, dtype=torch.bool)
    for q in range(2 * L):
        for k in range(2 * L):
            qn, kn = q < L, k < L
            bq, bk = (q % L) // B, (k % L) // B
            if qn and kn:
                m[q, k] = bq == bk
            elif qn and not kn:
                m[q, k] = bk < bq
            elif not qn and not kn:
                m[q, k] = bk <= bq
    return m


def brute_decode_block(cached: int, q_len: int, B: int) -> torch.Tensor:
    """New tokens after `cached` committed slots: all committed slots, and block-causal among the
    new tokens (blocks counted from the first new token)."""
    m = torch.zeros(q_len, cached + q_len, dtype=torch.bool)
    for i in range(q_len):
        for k in range(cached + q_len):
            m[i, k] = k < cached or (k - cached) // B <= i // B
    return m


@pytest.mark.parametrize("P,R,B", [(5, 8, 4), (7, 12, 4), (3, 16, 8), (1, 16, 16), (4, 6, 2), (6, 8, 1)])
def test_rad_matches_brute_force(P, R, B):
    got = masks.dense(masks.rad_rule(P, R, B), P + 2 * R, P + 2 * R)
    assert torch.equal(got, brute_rad(P, R, B))


@pytest.mark.parametrize("L,B", [(8, 4), (12, 4), (16, 8), (6, 2)])
def test_symmetric_matches_brute_force(L, B):
    got = masks.dense(masks.symmetric_rule(L, B), 2 * L, 2 * L)
    assert torch.equal(got, brute_symmetric(L, B))


@pytest.mark.parametrize("cached,q_len,B", [(0, 4, 4), (5, 4, 4), (9, 8, 4), (3, 16, 8), (7, 6, 2)])
def test_decode_block_matches_brute_force(cached, q_len, B):
    assert torch.equal(masks.decode_block(cached, q_len, B), brute_decode_block(cached, q_len, B))


@pytest.mark.parametrize("cached,q_len", [(0, 5), (4, 1), (6, 3)])
def test_decode_causal(cached, q_len):
    want = torch.tensor(
        [[k <= cached + i for k in range(cached + q_len)] for i in range(q_len)], dtype=torch.bool
    )
    assert torch.equal(masks.decode_causal(cached, q_len), want)


def test_rad_rows_are_what_decoding_sees():
    """A noisy block's row in the RAD mask, restricted to [prefix | clean blocks < i | noisy block i],
    is the decode_block row of that block after committing prefix + i clean blocks."""
    P, R, B = 5, 12, 4
    rad = masks.dense(masks.rad_rule(P, R, B), P + 2 * R, P + 2 * R)
    for i in range(R // B):
        keys = list(range(P)) + [P + R + j for j in range(i * B)] + [P + i * B + j for j in range(B)]
        rows = [P + i * B + j for j in range(B)]
        sub = rad[rows][:, keys]
        assert torch.equal(sub, masks.decode_block(P + i * B, B, B))
        # and nothing else: the noisy block sees no other slot
        assert int(rad[rows].sum()) == int(sub.sum())


def test_every_rad_row_is_nonempty_and_noisy_never_leaks_forward():
    P, R, B = 4, 8, 4
    m = masks.dense(masks.rad_rule(P, R, B), P + 2 * R, P + 2 * R)
    assert bool(m.any(1).all())
    # clean tokens never see noisy ones; noisy block i never sees clean block >= i (the answer)
    assert not bool(m[P + R :, P : P + R].any())
    for q, j in itertools.product(range(R), range(R)):
        if j // B >= q // B:
            assert not bool(m[P + q, P + R + j])


def test_flex_block_mask_agrees_with_dense():
    pytest.importorskip("torch.nn.attention.flex_attention")
    P, R, B = 40, 64, 16
    S = P + 2 * R
    rule = masks.rad_rule(P, R, B)
    bm = masks.flex_block_mask(rule, S, S, device="cpu")
    dense = masks.dense(rule, S, S)
    # mask_mod evaluated by the block mask reproduces the dense rule element by element
    q = torch.arange(S)[:, None]
    k = torch.arange(S)[None, :]
    assert torch.equal(bm.mask_mod(0, 0, q, k).expand(S, S), dense)
    # and its tile map keeps exactly the tiles that hold at least one allowed pair
    tile = bm.BLOCK_SIZE[0]
    n = -(-S // tile)
    tiles = torch.zeros(n, n, dtype=torch.bool)
    for a in range(n):
        for b in range(n):
            tiles[a, b] = bool(dense[a * tile : (a + 1) * tile, b * tile : (b + 1) * tile].any())
    assert torch.equal(bm.to_dense()[0, 0].bool(), tiles)


def brute_duplicated(P: int, R: int, B: int) -> torch.Tensor:
    """[prefix | noisy | prefix | clean], written from the description: both prefix copies causal
    within their copy; noisy block i: the clean copy's prefix, clean blocks < i, itself; clean
    block i: the clean prefix and clean blocks <= i."""
    L = P + R
    S = 2 * L

    def where(i):  # (copy, region, block)
        copy = "noisy" if i < L else "clean"
        j = i % L
        return (copy, "prefix", None) if j < P else (copy, "response", (j - P) // B)

    m = torch.zeros(S, S, dtype=torch.bool)
    for q in range(S):
        cq, rq, bq = where(q)
        for k in range(S):
            ck, rk, bk = where(k)
            if rq == "prefix":
                ok = rk == "prefix" and ck == cq and k <= q
            elif cq == "noisy":
                ok = (
                    (ck == "clean" and rk == "prefix")
                    or (ck == "noisy" and rk == "response" and bk == bq)
                    or (ck == "clean" and rk == "response" and bk < bq)
                )
            else:
                ok = ck == "clean" and (rk == "prefix" or bk <= bq)
            m[q, k] = ok
    return m


@pytest.mark.parametrize("P,R,B", [(5, 8, 4), (7, 12, 4), (3, 16, 8), (1, 16, 16), (4, 6, 2)])
def test_duplicated_matches_brute_force(P, R, B):
    got = masks.dense(masks.duplicated_rule(P, R, B), 2 * (P + R), 2 * (P + R))
    assert torch.equal(got, brute_duplicated(P, R, B))


@pytest.mark.parametrize("P,R,B", [(5, 8, 4), (3, 16, 8)])
def test_duplicated_supervised_rows_see_what_rad_rows_see(P, R, B):
    """Dropping the noisy prefix copy maps the duplicated layout's response rows onto RAD's rows
    exactly: the full-duplication baseline differs from RAD only in cost."""
    dup = masks.dense(masks.duplicated_rule(P, R, B), 2 * (P + R), 2 * (P + R))
    rad = masks.dense(masks.rad_rule(P, R, B), P + 2 * R, P + 2 * R)
    keep = list(range(P, 2 * (P + R)))  # noisy response, clean prefix, clean response
    # reorder the kept slots into RAD's order: [prefix | noisy | clean]
    L = P + R
    order = list(range(L, L + P)) + list(range(P, L)) + list(range(L + P, 2 * L))
    assert sorted(order) == keep
    assert torch.equal(dup[order][:, order], rad)
    assert not dup[P:L, :P].any() and not dup[L:, :P].any()  # nothing reads the noisy prefix copy
