"""ExchangePlan index math in one process: every needed element arrives
exactly once, pieces lie inside both their source tile and the clipped need,
identity detection, halos wider than a neighbour's tile, empty needs and the
byte counts (remote bytes only)."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from hpcnn.ops import make_op
from hpcnn.parallel import Box, Layout
from hpcnn.parallel.exchange_plan import ExchangePlan, needed_boxes
from hpcnn.parallel.overlap import chunks_touching
from hpcnn.parallel.layout import LayoutError, split_bounds

WORLD = 8


@st.composite
def layouts(draw, shape=None, max_k=WORLD):
    if shape is None:
        # images (n, c, h, w) and volumes (n, c, d, h, w)
        shape = tuple(draw(st.lists(st.integers(1, 9), min_size=4, max_size=5)))
    degrees, k = [], 1
    for s in shape:
        d = draw(st.integers(1, max(1, min(s, max_k // k))))
        degrees.append(d)
        k *= d
    ranks = draw(st.permutations(range(WORLD)))[:k]
    return Layout(shape, degrees, ranks)


@st.composite
def boxes(draw, shape):
    out = []
    for s in shape:
        lo = draw(st.integers(-4, s + 2))
        out.append((lo, lo + draw(st.integers(0, s + 6))))
    return Box(out)


@st.composite
def plans(draw):
    src = draw(layouts())
    dsts = draw(st.lists(st.integers(0, WORLD - 1), min_size=0, max_size=WORLD, unique=True))
    needs = {r: draw(boxes(src.shape)) for r in dsts}
    itemsize = draw(st.sampled_from([4, 8]))
    return src, needs, itemsize


def brute_force_pieces(src, needs):
    out = set()
    for d, need in needs.items():
        c = Box(need).clip(src.shape)
        for s in src.ranks:
            p = src.box(s).intersect(c)
            if not p.empty:
                out.add((s, d, p))
    return out


@settings(max_examples=150, deadline=None)
@given(plans())
def test_every_needed_element_arrives_exactly_once(case):
    src, needs, itemsize = case
    plan = ExchangePlan.compile(src, needs, itemsize)
    for d, need in needs.items():
        c = Box(need).clip(src.shape)
        assert plan.need(d) == c
        count = np.zeros(c.shape, dtype=int)
        for s, b in plan.receives(d):
            count[b.slices(c.lo)] += 1
        assert (count == 1).all()


@settings(max_examples=150, deadline=None)
@given(plans())
def test_pieces_lie_in_source_tile_and_clipped_need(case):
    src, needs, itemsize = case
    plan = ExchangePlan.compile(src, needs, itemsize)
    for s, d, b in plan.pieces:
        assert not b.empty
        assert src.box(s).contains(b)
        assert Box(needs[d]).clip(src.shape).contains(b)
    assert set(plan.pieces) == brute_force_pieces(src, needs)
    assert len(set((s, d) for s, d, _ in plan.pieces)) == len(plan.pieces)


@settings(max_examples=150, deadline=None)
@given(plans())
def test_byte_counts_are_remote_bytes_only(case):
    src, needs, itemsize = case
    plan = ExchangePlan.compile(src, needs, itemsize)
    sent = {r: 0 for r in range(WORLD)}
    recv = {r: 0 for r in range(WORLD)}
    for s, d, b in brute_force_pieces(src, needs):
        if s != d:
            sent[s] += b.volume * itemsize
            recv[d] += b.volume * itemsize
    for r in range(WORLD):
        assert plan.bytes_sent(r) == sent[r]
        assert plan.bytes_received(r) == recv[r]
    assert plan.total_bytes() == sum(sent.values()) == sum(recv.values())
    assert plan.max_rank_bytes() == max(max(sent[r], recv[r]) for r in range(WORLD))


@settings(max_examples=100, deadline=None)
@given(layouts())
def test_own_tiles_are_the_identity(src):
    plan = ExchangePlan.compile(src, src.boxes(), 8)
    assert plan.identity
    assert plan.total_bytes() == 0 and plan.max_rank_bytes() == 0
    assert all(s == d for s, d, _ in plan.pieces)


@settings(max_examples=100, deadline=None)
@given(layouts(), layouts())
def test_identity_only_when_every_need_is_the_own_tile(a, b):
    if a.shape != b.shape:
        b = Layout(a.shape, (1,) * len(a.shape), b.ranks[:1])
    plan = ExchangePlan.compile(a, b.boxes(), 4)
    expect = all(r in a and a.box(r) == b.box(r) for r in b.ranks)
    assert plan.identity == expect
    if not plan.identity and plan.total_bytes() == 0:
        # no remote bytes but a copy: some rank needs a strict part of its tile
        assert any(r in a and a.box(r) != b.box(r) for r in b.ranks)


def test_identity_needs_unclipped_padding_to_match():
    L = Layout((2, 3, 8, 8), (1, 1, 2, 1))
    # padding beyond the tensor is clipped away: still the identity
    needs = {r: Box((lo, hi) if a != 3 else (-1, 9) for a, (lo, hi) in enumerate(L.box(r)))
             for r in L.ranks}
    assert ExchangePlan.compile(L, needs, 8).identity


def test_empty_needs_move_nothing():
    L = Layout((4, 6, 5, 5), (2, 1, 1, 2))
    needs = {r: Box(((0, 0), (0, 6), (0, 5), (0, 5))) for r in range(4)}
    needs[5] = Box(((9, 12), (0, 6), (0, 5), (0, 5)))  # entirely outside the tensor
    plan = ExchangePlan.compile(L, needs, 8)
    assert plan.pieces == () and plan.total_bytes() == 0
    assert plan.need(5).empty and not plan.identity
    assert ExchangePlan.compile(L, {}, 8).identity  # nobody needs anything


def test_halo_wider_than_neighbour_tile():
    # 4 tiles of 2 rows; a dilated 7x7 kernel reads 13 rows around each tile
    conv = make_op("conv2d", "c", out_channels=2, kernel_size=7, dilation=2, padding=6)
    shape = (1, 2, 8, 8)
    out = Layout(conv.infer_shape([shape]), (1, 1, 4, 1))
    src = Layout(shape, (1, 1, 4, 1))
    needs = needed_boxes(conv, 0, out, [shape])
    assert needs[1] == Box(((0, 1), (0, 2), (-4, 10), (-6, 14)))
    plan = ExchangePlan.compile(src, needs, 8)
    # interior rank 1 receives from every other rank: its halo spans three tiles
    assert sorted(s for s, _ in plan.receives(1)) == [0, 1, 2, 3]
    assert plan.bytes_received(1) == 6 * 2 * 8 * 8
    assert plan.bytes_sent(1) == 3 * (2 * 2 * 8) * 8


def test_redistribution_between_channel_and_sample_splits():
    shape = (4, 6, 3, 3)
    a = Layout(shape, (4, 1, 1, 1))
    b = Layout(shape, (1, 2, 1, 1), ranks=(2, 3))
    plan = ExchangePlan.compile(a, b.boxes(), 4)
    assert not plan.identity
    # each of ranks 2, 3 gathers its 3 channels of all 4 samples; it owns one sample
    assert plan.bytes_received(2) == 3 * 3 * 3 * 3 * 4
    assert plan.bytes_sent(0) == 2 * 3 * 9 * 4
    assert plan.bytes_sent(2) == 3 * 9 * 4  # only to rank 3
    assert plan.max_rank_bytes() == 3 * 3 * 9 * 4


def test_compile_is_cached_and_validates():
    L = Layout((4, 4), (2, 2))
    needs = {0: Box(((0, 4), (0, 4)))}
    assert ExchangePlan.compile(L, needs, 8) is ExchangePlan.compile(L, dict(needs), 8)
    assert ExchangePlan.compile(L, needs, 8) is not ExchangePlan.compile(L, needs, 4)
    with pytest.raises(LayoutError, match="dimensions"):
        ExchangePlan.compile(L, {0: Box(((0, 1),))}, 8)
    with pytest.raises(LayoutError, match="Layout"):
        ExchangePlan.compile((4, 4), needs, 8)


@given(st.integers(1, 40), st.integers(1, 12), st.data())
def test_chunks_touching_matches_bounds(size, parts, data):
    parts = min(parts, size)
    lo = data.draw(st.integers(0, size))
    hi = data.draw(st.integers(lo, size))
    want = [i for i, (a, b) in enumerate(split_bounds(size, parts)) if max(a, lo) < min(b, hi)]
    assert list(chunks_touching(size, parts, lo, hi)) == want


@settings(max_examples=100, deadline=None)
@given(plans())
def test_local_identity_means_own_tile_and_no_messages(case):
    src, needs, itemsize = case
    plan = ExchangePlan.compile(src, needs, itemsize)
    for r in range(WORLD):
        want = (r in src and r in needs and Box(needs[r]).clip(src.shape) == src.box(r)
                and plan.bytes_sent(r) == 0 and plan.bytes_received(r) == 0
                and all(d == r for d, _ in plan.sends(r)))
        assert plan.local_identity(r) == want
    if plan.identity:
        assert all(plan.local_identity(r) or plan.sends(r) == () for r in plan.destinations
                   if plan.need(r) is not None and not plan.need(r).empty)


def test_exchange_category():
    from hpcnn.parallel.exchange_plan import HALO, REDIST, exchange_category
    a = Layout((4, 8, 6, 6), (1, 1, 2, 2))
    assert exchange_category(a, Layout((4, 16, 3, 3), (1, 1, 2, 2))) == HALO
    assert exchange_category(a, Layout((4, 8, 6, 6), (1, 1, 2, 2), ranks=(3, 2, 1, 0))) == REDIST
    assert exchange_category(a, Layout((4, 8, 6, 6), (2, 1, 2, 1))) == REDIST
    assert exchange_category(Layout((4, 8), (2, 1)), Layout((4,), (2,))) == REDIST
