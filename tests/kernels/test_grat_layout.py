"""GRAT layouts: permutation, adjacency, text rules, BlockMask tables and densities."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from fxdit.kernels import grat_layout as L
from hypothesis import given
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import create_block_mask

# --------------------------------------------------------------------------------------------- permutation


@pytest.mark.parametrize("grid,group", [((8, 8), (4, 4)), ((6, 10), (3, 5)), ((4, 6, 8), (2, 3, 4)),
                                        ((2, 4, 4), (1, 2, 4)), ((4, 4), (4, 4)), ((5, 7), (1, 1))])
def test_permutation_inverse_and_groups_contiguous(grid, group):
    perm, inv = L.group_permutation(grid, group)
    n = math.prod(grid)
    assert perm.dtype == torch.int64 and perm.shape == (n,)
    assert torch.equal(perm[inv], torch.arange(n)) and torch.equal(inv[perm], torch.arange(n))
    g3 = grid if len(grid) == 3 else (1, *grid)
    s3 = group if len(group) == 3 else (1, *group)
    ng = [a // b for a, b in zip(g3, s3)]
    g = math.prod(s3)
    prev_in_group = None
    for i, orig in enumerate(perm.tolist()):
        t, rem = divmod(orig, g3[1] * g3[2])
        h, w = divmod(rem, g3[2])
        gid = (t // s3[0]) * ng[1] * ng[2] + (h // s3[1]) * ng[2] + (w // s3[2])
        assert gid == i // g  # groups contiguous, in raster order of the group grid
        local = ((t % s3[0]) * s3[1] + h % s3[1]) * s3[2] + w % s3[2]
        assert local == i % g  # raster order inside the group
        prev_in_group = local
    assert prev_in_group == g - 1


def test_permutation_roundtrip_on_tensor():
    x = torch.randn(2, 3, 48, 5)
    perm, inv = L.group_permutation((6, 8), (3, 4))
    assert torch.equal(x[..., perm, :][..., inv, :], x)


@pytest.mark.parametrize("grid,group,needle", [((8, 8), (3, 4), "does not divide"), ((8, 8), (4, 4, 4), "match"),
                                               ((8,), (8,), "expected (H, W)"), ((8, 8), (0, 4), "positive")])
def test_why_not_layout(grid, group, needle):
    reason = L.why_not_layout(grid, group)
    assert reason is not None and needle in reason
    with pytest.raises(ValueError, match="grid|group"):
        L.group_permutation(grid, group)


def test_why_not_layout_accepts_dividing_groups():
    assert L.why_not_layout((32, 48, 80), (4, 8, 8)) is None
    assert L.why_not_layout((64, 64), (16, 16)) is None


# --------------------------------------------------------------------------------------------- adjacency


def _brute_adjacency(grid, group, mode, radius):
    g3 = grid if len(grid) == 3 else (1, *grid)
    s3 = group if len(group) == 3 else (1, *group)
    ng = [a // b for a, b in zip(g3, s3)]
    coords = list(itertools.product(*(range(n) for n in ng)))
    out = torch.zeros(len(coords), len(coords), dtype=torch.bool)
    for i, p in enumerate(coords):
        for j, m in enumerate(coords):
            if mode == "grat-b":
                ok = all(abs(a - b) <= radius for a, b in zip(p, m))
            elif len(grid) == 2:
                ok = p[1] == m[1] or p[2] == m[2]
            else:
                ok = p[0] == m[0] or p[1] == m[1] or p[2] == m[2]
            out[i, j] = ok
    return out


@pytest.mark.parametrize("mode", ["grat-b", "grat-x"])
@pytest.mark.parametrize("grid,group,radius", [((12, 16), (2, 4), 1), ((8, 8), (2, 2), 2), ((4, 6, 8), (2, 2, 2), 1),
                                               ((6, 4, 4), (2, 2, 2), 0), ((4, 4), (4, 4), 1)])
def test_adjacency_matches_brute_force(mode, grid, group, radius):
    adj = L.group_adjacency(grid, group, mode, radius)
    assert adj.dtype == torch.bool
    assert torch.equal(adj, _brute_adjacency(grid, group, mode, radius))
    assert torch.equal(adj, adj.T)  # both patterns are symmetric


def test_adjacency_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        L.group_adjacency((8, 8), (4, 4), "grat-z")


# --------------------------------------------------------------------------------------------- text rules


def _brute_mask(layout: L.SequenceLayout):
    """The element mask by the official predicates (grat.md §2.4), position by position."""
    s = layout.seq_len
    adj = _brute_adjacency(layout.grid, layout.group, layout.mode, layout.radius)
    g3 = layout.grid if len(layout.grid) == 3 else (1, *layout.grid)
    s3 = layout.group if len(layout.group) == 3 else (1, *layout.group)
    ng = [a // b for a, b in zip(g3, s3)]
    g = layout.group_tokens
    padded = set()
    for a, b in layout.text_pad:
        padded.update(range(a, b))

    def img_group(i):
        r = i - layout.image_start
        if layout.permuted:  # group order: groups are contiguous runs of g tokens
            return r // g
        t, rem = divmod(r, g3[1] * g3[2])  # raster order: the token's (t, h, w) gives its group
        h, w = divmod(rem, g3[2])
        return ((t // s3[0]) * ng[1] + h // s3[1]) * ng[2] + w // s3[2]

    out = torch.zeros(s, s, dtype=torch.bool)
    for i in range(s):
        q_img = layout.image_start <= i < layout.image_stop
        for j in range(s):
            k_img = layout.image_start <= j < layout.image_stop
            valid_key = j not in padded
            text_row_or_text_key = (not q_img) or (not k_img and valid_key)
            pattern = q_img and k_img and bool(adj[img_group(i), img_group(j)])
            out[i, j] = (pattern or text_row_or_text_key) and valid_key
    return out


LAYOUTS = [
    L.SequenceLayout.image_then_text((4, 4), (2, 2), "grat-b", text_len=5, text_valid=3),
    L.SequenceLayout.text_then_image((4, 4), (2, 2), "grat-x", text_len=5, text_valid=2),
    L.SequenceLayout.text_then_image((4, 6), (2, 3), "grat-b", 0, text_len=3),
    L.SequenceLayout.image_then_text((2, 4, 4), (1, 2, 2), "grat-x", text_len=4, text_valid=4),
    L.SequenceLayout(seq_len=30, image_start=7, grid=(4, 4), group=(2, 2), mode="grat-x",
                     text_pad=((2, 4), (26, 30))),  # text on both sides, padding in both spans
    L.SequenceLayout(seq_len=20, image_start=2, grid=(4, 4), group=(2, 2), mode="grat-b", permuted=False,
                     text_pad=((18, 20),)),
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: f"{x.mode}-{x.image_start}-{x.seq_len}-{x.permuted}")
def test_dense_mask_follows_official_text_rules(layout):
    assert torch.equal(L.dense_mask(layout), _brute_mask(layout))


def test_token_groups_ids():
    lay = L.SequenceLayout.text_then_image((4, 4), (2, 2), "grat-b", text_len=5, text_valid=3)
    cls = L.token_groups(lay)
    assert cls.dtype == torch.int32
    assert cls[:3].tolist() == [lay.text_valid_id] * 3 and cls[3:5].tolist() == [lay.text_pad_id] * 2
    assert cls[5:].tolist() == [i // 4 for i in range(16)]
    adj = L.group_adj(lay)
    assert not adj[:, lay.text_pad_id].any() and adj[:, lay.text_valid_id].all()
    assert adj[lay.text_valid_id, : lay.text_valid_id + 1].all() and adj[lay.text_pad_id, : lay.text_valid_id + 1].all()


def test_layout_validation():
    with pytest.raises(ValueError, match="does not fit"):
        L.SequenceLayout(seq_len=10, image_start=0, grid=(4, 4), group=(2, 2))
    with pytest.raises(ValueError, match="overlaps"):
        L.SequenceLayout(seq_len=20, image_start=0, grid=(4, 4), group=(2, 2), text_pad=((10, 18),))
    with pytest.raises(ValueError, match="does not divide"):
        L.SequenceLayout(seq_len=16, image_start=0, grid=(4, 4), group=(3, 2))


# --------------------------------------------------------------------------------------------- tables


def _flex_tables(layout, block_size):
    dm = L.dense_mask(layout)

    def mask_mod(b, h, q, k):
        return dm[q, k]

    return create_block_mask(mask_mod, None, None, layout.seq_len, layout.seq_len, device="cpu",
                             BLOCK_SIZE=block_size)


def _block_sets(num, idx):
    num = num.reshape(-1).tolist()
    idx = idx.reshape(len(num), -1)
    return [sorted(idx[r, :n].tolist()) for r, n in enumerate(num)]


TABLE_LAYOUTS = LAYOUTS + [
    L.SequenceLayout.image_then_text((8, 8), (4, 4), "grat-b"),
    L.SequenceLayout.text_then_image((8, 12), (4, 4), "grat-x", text_len=23, text_valid=17),
    L.SequenceLayout.image_then_text((2, 8, 8), (1, 4, 4), "grat-b", 1, text_len=9, text_valid=5),
]


@pytest.mark.parametrize("layout", TABLE_LAYOUTS, ids=lambda x: f"{x.mode}-{x.grid}-{x.seq_len}-{x.permuted}")
@pytest.mark.parametrize("block_size", [16, 32])
def test_tables_match_create_block_mask(layout, block_size):
    ours = L.block_mask_tables(layout, block_size)
    ref = _flex_tables(layout, block_size)
    for t in ours[:4]:
        assert t.dtype == torch.int32 and t.shape[:2] == (1, 1)
    assert torch.equal(ours.kv_num_blocks, ref.kv_num_blocks)
    assert torch.equal(ours.full_kv_num_blocks, ref.full_kv_num_blocks)
    assert _block_sets(ours.kv_num_blocks, ours.kv_indices) == _block_sets(ref.kv_num_blocks, ref.kv_indices)
    assert (_block_sets(ours.full_kv_num_blocks, ours.full_kv_indices)
            == _block_sets(ref.full_kv_num_blocks, ref.full_kv_indices))


def test_tables_are_cached():
    lay = L.SequenceLayout.image_then_text((8, 8), (4, 4), "grat-x")
    assert L.block_mask_tables(lay, 16) is L.block_mask_tables(lay, 16)
    assert L.block_mask_tables(lay).block_size == 16


@pytest.mark.parametrize("group,expected", [((16, 16), 128), ((8, 8), 64), ((4, 8), 32), ((4, 4), 16),
                                            ((4, 8, 8), 128), ((3, 3), 16)])
def test_default_block_size(group, expected):
    assert L.default_block_size(group) == expected


@st.composite
def aligned_layouts(draw):
    three_d = draw(st.booleans())
    group = (draw(st.sampled_from([1, 2])),) if three_d else ()
    group += (draw(st.sampled_from([2, 4, 8])), draw(st.sampled_from([8, 16])))  # g % 16 == 0
    counts = tuple(draw(st.integers(1, 5)) for _ in group)
    if three_d:
        counts = (draw(st.integers(1, 3)),) + counts[1:]
    grid = tuple(g * c for g, c in zip(group, counts))
    mode = draw(st.sampled_from(["grat-b", "grat-x"]))
    radius = draw(st.integers(0, 2))
    return grid, group, mode, radius


@given(aligned_layouts())
def test_block_density_equals_closed_form_when_groups_align(params):
    grid, group, mode, radius = params
    layout = L.SequenceLayout.image_then_text(grid, group, mode, radius)
    tables = L.block_mask_tables(layout)  # default block size divides the group
    assert int(tables.kv_num_blocks.sum()) == 0  # no partial blocks
    expected = L.closed_form_density(grid, group, mode, radius)
    assert L.block_density(tables) == pytest.approx(expected, rel=1e-12)
    # the token-level density of the dense mask agrees too
    assert L.dense_mask(layout).double().mean().item() == pytest.approx(expected, rel=1e-12)


def test_closed_form_numbers_of_the_design_note():
    # grat.md §6 table ([derived] numbers)
    assert L.closed_form_density((128, 128), (16, 16), "grat-x") == pytest.approx(0.234, abs=5e-4)
    assert L.closed_form_density((128, 128), (16, 16), "grat-b") == pytest.approx(0.118, abs=5e-4)
    assert L.closed_form_density((512, 512), (16, 16), "grat-b") == pytest.approx(0.0084, abs=5e-5)
    assert L.closed_form_density((32, 48, 80), (4, 8, 8), "grat-x") == pytest.approx(165 / 480)
    assert L.closed_form_density((32, 48, 80), (4, 8, 8), "grat-b") == pytest.approx(0.0428, abs=5e-5)
    assert L.closed_form_density((256, 256), (16, 16), "grat-x", text_len=512) == pytest.approx(0.135, abs=5e-4)
    assert L.closed_form_density((256, 256), (16, 16), "grat-b", text_len=512) == pytest.approx(0.0472, abs=5e-4)
    assert L.ideal_speedup(0.25) == 4.0


@pytest.mark.parametrize("layout", [
    L.SequenceLayout.image_then_text((8, 8), (4, 4), "grat-x", text_len=16, text_valid=16),
    L.SequenceLayout.text_then_image((8, 8), (4, 4), "grat-b", text_len=32, text_valid=32),
])
def test_closed_form_with_text_matches_dense_mask(layout):
    text_len = layout.seq_len - layout.num_image_tokens
    expected = L.closed_form_density(layout.grid, layout.group, layout.mode, layout.radius, text_len=text_len)
    assert L.dense_mask(layout).double().mean().item() == pytest.approx(expected, rel=1e-12)
    assert L.block_density(L.block_mask_tables(layout, 16)) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("layout", TABLE_LAYOUTS[-3:] + LAYOUTS[-1:], ids=lambda x: f"{x.mode}-{x.seq_len}")
def test_block_flags_dense_and_sparse_paths_agree(layout, monkeypatch):
    cls, adj = L.token_groups(layout), L.group_adj(layout)
    sparse = L.block_flags(cls, cls, adj, 16)
    monkeypatch.setattr(L, "_SPARSE_PAIRS_LIMIT", 0)
    dense = L.block_flags(cls, cls, adj, 16)
    assert torch.equal(sparse[0], dense[0]) and torch.equal(sparse[1], dense[1])
