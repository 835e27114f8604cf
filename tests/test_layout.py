"""Box and Layout: tiles partition the tensor, sizes follow
numpy.array_split, ranks are laid row-major with n outermost, groups, and
clear errors for degrees that do not fit."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from hpcnn.parallel import Box, Layout, LayoutError
from hpcnn.parallel.layout import degrees_from_config, split_bounds


@st.composite
def shapes_and_degrees(draw, max_k=12):
    ndim = draw(st.sampled_from([1, 2, 4]))
    shape = tuple(draw(st.lists(st.integers(1, 11), min_size=ndim, max_size=ndim)))
    degrees, k = [], 1
    for s in shape:
        d = draw(st.integers(1, max(1, min(s, max_k // k))))
        degrees.append(d)
        k *= d
    return shape, tuple(degrees)


@settings(max_examples=200, deadline=None)
@given(shapes_and_degrees(), st.data())
def test_tiles_partition_the_tensor(sd, data):
    shape, degrees = sd
    k = int(np.prod(degrees))
    world = k + data.draw(st.integers(0, 3))
    ranks = data.draw(st.permutations(range(world)))[:k]
    L = Layout(shape, degrees, ranks, world=world)
    count = np.zeros(shape, dtype=int)
    owner = np.full(shape, -1)
    for r in L.ranks:
        b = L.box(r)
        assert not b.empty
        count[b.slices()] += 1
        owner[b.slices()] = r
    assert (count == 1).all()
    # ranks outside the layout hold nothing
    for r in range(world):
        if r not in ranks:
            assert L.box(r) is None and L.coords(r) is None and r not in L
            assert all(L.extent(r, dim) == (0 if dim in L.dims else 1) for dim in "ncdhw")
    # extent (computed from one coordinate) is the box's length
    for r in L.ranks:
        for a, dim in enumerate(L.dims):
            assert L.extent(r, dim) == L.box(r)[a][1] - L.box(r)[a][0]


@settings(max_examples=200, deadline=None)
@given(shapes_and_degrees())
def test_tile_sizes_follow_array_split(sd):
    shape, degrees = sd
    L = Layout(shape, degrees)
    for a, (s, d) in enumerate(zip(shape, degrees)):
        want = [len(c) for c in np.array_split(np.arange(s), d)]
        assert [hi - lo for lo, hi in split_bounds(s, d)] == want
        # the tile of grid coordinate i along axis a has the i-th size
        for r in L.ranks:
            c = L.coords(r)
            assert L.box(r).shape[a] == want[c[a]]
    assert L.max_tile_volume() == max(L.box(r).volume for r in L.ranks)


@settings(max_examples=100, deadline=None)
@given(shapes_and_degrees())
def test_ranks_are_row_major_with_n_outermost(sd):
    shape, degrees = sd
    L = Layout(shape, degrees)
    for i, r in enumerate(L.ranks):
        c = L.coords(r)
        assert c == tuple(int(x) for x in np.unravel_index(i, degrees))
        assert L.rank_at(c) == r
    # rank order sorts the tiles' lower corners lexicographically
    corners = [L.box(r).lo for r in L.ranks]
    assert corners == sorted(corners)


@settings(max_examples=100, deadline=None)
@given(shapes_and_degrees(), st.data())
def test_degree_larger_than_dimension_is_a_clear_error(sd, data):
    shape, degrees = sd
    a = data.draw(st.integers(0, len(shape) - 1))
    bad = list(degrees)
    bad[a] = shape[a] + data.draw(st.integers(1, 3))
    name = ("n", "c", "h", "w")[a] if len(shape) == 4 else ("n", "c")[a]
    with pytest.raises(LayoutError, match=f"degree {bad[a]} of dimension {name} is larger than its size {shape[a]}"):
        Layout(shape, bad)


def test_other_layout_errors_name_the_problem():
    with pytest.raises(LayoutError, match="need 4 ranks but the job has 3"):
        Layout((4, 4, 4, 4), (2, 1, 2, 1), world=3)
    with pytest.raises(LayoutError, match="need 2 ranks, got 3"):
        Layout((4, 4), (2, 1), ranks=(0, 1, 2))
    with pytest.raises(LayoutError, match="repeat"):
        Layout((4, 4), (2, 1), ranks=(1, 1))
    with pytest.raises(LayoutError, match="at least 1"):
        Layout((4, 4), (0, 1))
    with pytest.raises(LayoutError, match="1, 2, 4 or 5 dimensions"):
        Layout((4, 4, 4), (1, 1, 1))
    with pytest.raises(LayoutError, match="does not have"):
        degrees_from_config((8, 10), {"n": 2, "h": 2})
    with pytest.raises(LayoutError, match="unknown dimension"):
        degrees_from_config((8, 10), {"x": 2})


def test_groups_share_the_channel_slice():
    L = Layout((4, 6, 5, 5), (2, 3, 1, 2))  # 12 ranks
    g = L.group(0, ("n", "h", "w"))
    assert g == (0, 1, 6, 7)
    assert all(L.box(r)[1] == L.box(0)[1] for r in g)
    groups = L.groups(("n", "h", "w"))
    assert sorted(r for grp in groups for r in grp) == list(range(12))
    assert len(groups) == 3
    assert L.group(99, ("n",)) == ()


def test_serialisation_and_equality():
    L = Layout((8, 3, 7, 7), {"n": 2, "w": 3}, ranks=[5, 4, 3, 2, 1, 0])
    assert L.degrees == (2, 1, 1, 3)
    M = Layout.from_dict(L.to_dict())
    assert M == L and hash(M) == hash(L)
    assert Layout((8, 3, 7, 7), {"n": 2, "w": 3}) != L
    assert "ranks=" in repr(L)


@given(st.lists(st.tuples(st.integers(-5, 5), st.integers(-5, 9)), min_size=1, max_size=4),
       st.data())
def test_box_intersection_and_containment(pairs, data):
    a = Box(pairs)
    b = Box([(lo + data.draw(st.integers(-3, 3)), hi + data.draw(st.integers(-3, 3))) for lo, hi in pairs])
    c = a.intersect(b)
    assert a.contains(c) and b.contains(c)
    assert c.volume <= min(a.volume, b.volume)
    shape = tuple(max(1, hi) for _, hi in pairs)
    assert Box.full(shape).contains(a.clip(shape))
