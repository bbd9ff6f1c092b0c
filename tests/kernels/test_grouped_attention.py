"""Grouped attention: reference, Triton kernel (interpreter on CPU), custom op, CPU decomposition to FlexAttention.

Every result is compared with :func:`_gold`, a dense masked softmax computed here in fp64 from a mask built here
(``adj[q_group[i], kv_group[j]]``, key validity, and, for the block-table tests, which blocks the tables list), so no
check compares a path with the reference it calls.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from fxdit.kernels import grat_layout as L
from fxdit.kernels import ops
from fxdit.kernels.grouped_attention import grouped_attention
from fxdit.kernels.reference import grouped_attention_ref
from hypothesis import given
from hypothesis import strategies as st


def _tables(cls_q, cls_k, adj, block_size):
    full, partial = L.block_flags(cls_q, cls_k, adj, block_size)
    return L._tables_from_flags(full, partial)


def _inputs(layout, *, b=1, hq=2, hkv=2, d=16, dtype=torch.float32, valid=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = layout.seq_len
    q = torch.randn(b, hq, s, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, s, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, s, d, generator=g).to(dtype)
    kv_valid = (torch.rand(b, s, generator=g) > 0.25) if valid else None
    return q, k, v, kv_valid


def _element_mask(q_group, kv_group, adj, kv_valid=None):
    """bool ``[Sq, Sk]`` (``[B, 1, Sq, Sk]`` with ``kv_valid``): query i sees key j iff adj[q_group[i], kv_group[j]]."""
    mask = adj.bool()[q_group.long()[:, None], kv_group.long()[None, :]]
    if kv_valid is None:
        return mask
    return mask[None, None] & kv_valid.bool()[:, None, None, :]


def _gold(q, k, v, mask, scale):
    """fp64 softmax(q·kᵀ·scale) restricted to ``mask``, times v; GQA by head repetition; rows with no key → 0."""
    rep = q.shape[1] // k.shape[1]
    q, k, v = q.double(), k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
    if mask.dim() == 2:
        mask = mask[None, None]
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    row_max = scores.amax(-1, keepdim=True)
    weights = torch.exp(scores - torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)))
    weights = weights.masked_fill(~mask, 0.0)
    denom = weights.sum(-1, keepdim=True)
    return torch.einsum("bhqk,bhkd->bhqd", weights / torch.where(denom > 0, denom, torch.ones_like(denom)), v)


def _sdpa_oracle(q, k, v, mask, scale):
    """fp64 golden value for a dense boolean mask (see :func:`_gold`)."""
    return _gold(q, k, v, mask, scale)


# --------------------------------------------------------------------------------------------- reference


def test_reference_all_visible_equals_sdpa():
    q, k, v = torch.randn(2, 4, 37, 24), torch.randn(2, 2, 37, 24), torch.randn(2, 2, 37, 24)
    zeros = torch.zeros(37, dtype=torch.int32)
    out = grouped_attention_ref(q, k, v, zeros, zeros, torch.ones(1, 1, dtype=torch.bool))
    expected = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=1e-5)


def test_reference_equals_masked_sdpa_and_zero_rows():
    lay = L.SequenceLayout.image_then_text((4, 4), (2, 2), "grat-x", text_len=6, text_valid=4)
    cls = L.token_groups(lay)
    adj = L.group_adj(lay).clone()
    adj[1] = False  # query group 1 sees nothing
    q, k, v, kv_valid = _inputs(lay, b=2, valid=True)
    out = grouped_attention_ref(q, k, v, cls, cls, adj, kv_valid, scale=0.4, compute_dtype=torch.float64)
    mask = _element_mask(cls, cls, adj, kv_valid)
    torch.testing.assert_close(out, _sdpa_oracle(q, k, v, mask, 0.4).float(), atol=1e-6, rtol=1e-6)
    assert out[:, :, cls == 1].abs().max() == 0


# --------------------------------------------------------------------------------------------- Triton kernel


KERNEL_CASES = [
    # (layout, d, dtype, hq, hkv, valid, block_size)
    (L.SequenceLayout.image_then_text((8, 8), (4, 4), "grat-b"), 16, torch.float32, 2, 2, False, 16),
    (L.SequenceLayout.text_then_image((8, 8), (4, 4), "grat-x", text_len=21, text_valid=15), 12, torch.float32, 2,
     1, False, 16),
    (L.SequenceLayout.text_then_image((8, 8), (4, 4), "grat-x", text_len=21, text_valid=15), 32, torch.float16, 2,
     2, True, 16),
    (L.SequenceLayout.image_then_text((4, 8), (2, 4), "grat-b", text_len=9, text_valid=5), 12, torch.float16, 4, 2,
     False, 32),
    (L.SequenceLayout.image_then_text((2, 4, 8), (1, 4, 4), "grat-x", text_len=5), 32, torch.float32, 2, 2, True, 32),
    (L.SequenceLayout(seq_len=40, image_start=3, grid=(6, 6), group=(3, 3), mode="grat-b", permuted=False,
                      text_pad=((39, 40),)), 16, torch.float16, 1, 1, False, 16),
]


@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: f"{c[0].mode}-S{c[0].seq_len}-D{c[1]}-{c[2]}-bs{c[6]}")
def test_triton_kernel_matches_oracle(case):
    layout, d, dtype, hq, hkv, valid, bs = case
    cls = L.token_groups(layout)
    adj = L.group_adj(layout).clone()
    adj[0, :] = False  # a query group with no visible key: zero rows
    tables = _tables(cls, cls, adj, bs)
    q, k, v, kv_valid = _inputs(layout, b=2, hq=hq, hkv=hkv, d=d, dtype=dtype, valid=valid)
    scale = 1.0 / math.sqrt(d)
    out = grouped_attention(q, k, v, cls, cls, adj, *tables, kv_valid, scale=scale, block_size=bs,
                            check_values=True)
    assert out.dtype == dtype and out.shape == (2, hq, layout.seq_len, d) and out.is_contiguous()
    gold = _sdpa_oracle(q, k, v, _element_mask(cls, cls, adj, kv_valid), scale)
    same = grouped_attention_ref(q, k, v, cls, cls, adj, kv_valid, scale=scale, compute_dtype=None)
    err = (out.double() - gold).abs().max().item()
    err_ref = (same.double() - gold).abs().max().item()
    assert err <= 2 * err_ref + torch.finfo(dtype).eps, (err, err_ref)
    assert out[:, :, cls == 0].abs().max() == 0


def test_triton_kernel_non_contiguous_inputs():
    lay = L.SequenceLayout.image_then_text((4, 8), (2, 4), "grat-x", text_len=3)
    cls, adj = L.token_groups(lay), L.group_adj(lay)
    tables = L.block_mask_tables(lay, 16)
    qkv = torch.randn(1, lay.seq_len, 3, 2, 16)  # BSHD storage, as a fused qkv projection gives it
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    out = grouped_attention(q, k, v, cls, cls, adj, *tables[:4], block_size=16)
    gold = _sdpa_oracle(q, k, v, _element_mask(cls, cls, adj), 0.25)
    assert (out.double() - gold).abs().max().item() <= 1e-5


def _valid_args():
    lay = L.SequenceLayout.image_then_text((4, 4), (2, 2), "grat-b", text_len=4)
    cls, adj = L.token_groups(lay), L.group_adj(lay)
    t = L.block_mask_tables(lay, 16)
    q = torch.randn(1, 2, lay.seq_len, 16)
    return dict(q=q, k=q.clone(), v=q.clone(), q_group=cls, kv_group=cls, group_adj=adj, kv_num_blocks=t[0],
                kv_indices=t[1], full_kv_num_blocks=t[2], full_kv_indices=t[3])


@pytest.mark.parametrize("change,needle", [
    (lambda a: a.update(q=a["q"].double(), k=a["k"].double(), v=a["v"].double()), "dtype"),
    (lambda a: a.update(k=a["k"].half()), "dtypes"),
    (lambda a: a.update(q=a["q"][0]), "4-D"),
    (lambda a: a.update(k=a["k"][:, :, :-1]), "shapes"),
    (lambda a: a.update(q=torch.randn(1, 3, a["q"].shape[2], 16)), "multiple"),
    (lambda a: a.update(q=torch.randn(1, 2, a["q"].shape[2], 160), k=torch.randn(1, 2, a["q"].shape[2], 160),
                        v=torch.randn(1, 2, a["q"].shape[2], 160)), "head dims"),
    (lambda a: a.update(q_group=a["q_group"][:-1]), "q_group"),
    (lambda a: a.update(kv_group=a["kv_group"].float()), "kv_group"),
    (lambda a: a.update(group_adj=a["group_adj"].int()), "group_adj"),
    (lambda a: a.update(kv_num_blocks=a["kv_num_blocks"][..., :-1]), "kv_num_blocks"),
    (lambda a: a.update(full_kv_indices=a["full_kv_indices"][0]), "full_kv_indices"),
    (lambda a: a.update(kv_valid=torch.ones(2, a["q"].shape[2], dtype=torch.bool)), "kv_valid"),
])
def test_launcher_validation(change, needle):
    args = _valid_args()
    change(args)
    with pytest.raises(ValueError, match=needle):
        grouped_attention(**args, block_size=16)


def test_launcher_rejects_bad_block_size_and_values():
    args = _valid_args()
    with pytest.raises(ValueError, match="block_size"):
        grouped_attention(**args, block_size=24)
    args["q_group"] = args["q_group"].clone()
    args["q_group"][0] = 99
    with pytest.raises(ValueError, match="q_group values"):
        grouped_attention(**args, block_size=16, check_values=True)


@st.composite
def random_layouts(draw):
    group = (draw(st.sampled_from([1, 2, 4])), draw(st.sampled_from([2, 4])))
    grid = tuple(g * draw(st.integers(1, 3)) for g in group)
    text_len = draw(st.integers(0, 12))
    text_valid = draw(st.integers(0, text_len))
    first = draw(st.booleans())
    mode = draw(st.sampled_from(["grat-b", "grat-x"]))
    radius = draw(st.integers(0, 1))
    make = L.SequenceLayout.text_then_image if first else L.SequenceLayout.image_then_text
    layout = make(grid, group, mode, radius, text_len=text_len, text_valid=text_valid)
    valid = draw(st.booleans())
    hkv = draw(st.sampled_from([1, 2]))
    return layout, valid, hkv


@given(random_layouts())
def test_triton_kernel_equals_dense_masked_sdpa_random_layouts(params):
    layout, valid, hkv = params
    cls, adj = L.token_groups(layout), L.group_adj(layout)
    tables = L.block_mask_tables(layout, 16)
    q, k, v, kv_valid = _inputs(layout, hq=2, hkv=hkv, valid=valid)
    out = grouped_attention(q, k, v, cls, cls, adj, *tables[:4], kv_valid, scale=0.25, block_size=16)
    gold = _sdpa_oracle(q, k, v, _element_mask(cls, cls, adj, kv_valid), 0.25)
    assert (out.double() - gold).abs().max().item() <= 2e-6


# --------------------------------------------------------------------------------------------- custom op


def _op_args(layout, *, valid=False, hkv=2, d=16, bs=16, dtype=torch.float32):
    cls, adj = L.token_groups(layout), L.group_adj(layout)
    tables = L.block_mask_tables(layout, bs)
    q, k, v, kv_valid = _inputs(layout, b=2, hq=2, hkv=hkv, d=d, valid=valid, dtype=dtype)
    return (q, k, v, cls, cls, adj, *tables[:4], kv_valid, 1.0 / math.sqrt(d), bs)


@pytest.mark.parametrize("valid", [False, True])
def test_op_cpu_eager_equals_fp64_gold(valid):
    lay = L.SequenceLayout.text_then_image((4, 8), (2, 4), "grat-x", text_len=7, text_valid=5)
    args = _op_args(lay, valid=valid, hkv=1, d=12)
    out = torch.ops.fxdit.grouped_attention(*args)
    q, k, v, cls, _, adj = args[:6]
    mask = _element_mask(cls, cls, adj, args[10])
    assert not mask.all()
    gold = _gold(q, k, v, mask, args[11])
    assert out.dtype == torch.float32 and (out.double() - gold).abs().max().item() <= 2e-6
    assert (out.double() - _gold(q, k, v, torch.ones_like(mask), args[11])).abs().max().item() > 1e-2


def test_op_fake_strides():
    lay = L.SequenceLayout.text_then_image((4, 8), (2, 4), "grat-x", text_len=7, text_valid=5)
    args = _op_args(lay, valid=True, hkv=1, d=12)
    out = torch.ops.fxdit.grouped_attention(*args)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        fake = torch.ops.fxdit.grouped_attention(*fake_args)
    assert fake.shape == out.shape and fake.stride() == out.stride() and fake.dtype == out.dtype


def test_op_opcheck():
    lay = L.SequenceLayout.image_then_text((4, 4), (2, 2), "grat-b", text_len=3)
    torch.library.opcheck(torch.ops.fxdit.grouped_attention.default, _op_args(lay),
                          test_utils=("test_schema", "test_faketensor"))


def _compile_with_backend_decompositions(fn, args):
    from torch._inductor.compile_fx import compile_fx

    from fxdit import backend

    gm = torch.fx.symbolic_trace(fn)
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    FakeTensorProp(gm).propagate(*args)
    decomps = backend._decompositions(gm)
    assert decomps is not None and torch.ops.fxdit.grouped_attention.default in decomps
    return compile_fx(gm, list(args), decompositions=decomps, config_patches=ops.inductor_patches_for(gm))


def _check_compiled(layout, *, valid, hkv, d, dtype=torch.float32, bs=16):
    from torch._inductor.utils import run_and_get_code

    args = _op_args(layout, valid=valid, hkv=hkv, d=d, bs=bs, dtype=dtype)
    scale, block_size = args[11], args[12]
    tensors = args[:11]

    def fn(q, k, v, qg, kg, adj, a, b, c, e, kv_valid):
        out = torch.ops.fxdit.grouped_attention(q, k, v, qg, kg, adj, a, b, c, e, kv_valid, scale, block_size)
        return out * 2.0 + 1.0  # a same-index pointwise consumer (the epilogue the CPU flex template rejects)

    if valid is False:
        tensors = tensors[:10] + (None,)
    # compile inside run_and_get_code, so that the generated code is captured
    result, code = run_and_get_code(lambda: _compile_with_backend_decompositions(fn, tensors)(*tensors))
    assert code  # the checks on the generated code below read something
    out = result[0] if isinstance(result, (list, tuple)) else result
    q, k, v, cls, _, adj = tensors[:6]
    gold = _sdpa_oracle(q, k, v, _element_mask(cls, cls, adj, tensors[10]), scale) * 2.0 + 1.0
    same = grouped_attention_ref(q, k, v, cls, cls, adj, tensors[10], scale=scale, compute_dtype=None) * 2.0 + 1.0
    err = (out.double() - gold).abs().max().item()
    err_ref = (same.double() - gold).abs().max().item()
    assert err <= 2 * err_ref + 4 * torch.finfo(dtype).eps, (err, err_ref)
    # lowered, not called back into Python (inductor's comments still name the source op)
    assert not any("torch.ops.fxdit.grouped_attention" in c for c in code)
    if ops.grouped_attention_dense_lowering("cpu", dtype, dtype, dtype) is None:
        assert any("kviStrideB" in c for c in code)  # the C++ FlexAttention template, key validity included


@pytest.mark.parametrize("valid,hkv,d", [(False, 2, 16), (True, 1, 12)])
def test_decomposition_eager_semantics(valid, hkv, d):
    """The CPU decomposition run eagerly (the FlexAttention HOP's math path): same mask semantics, kv_valid merge."""
    lay = L.SequenceLayout.text_then_image((8, 8), (4, 4), "grat-b", text_len=21, text_valid=15)
    args = _op_args(lay, valid=valid, hkv=hkv, d=d)
    out = ops._grouped_attention_decomp(*args)
    q, k, v, cls, _, adj = args[:6]
    gold = _sdpa_oracle(q, k, v, _element_mask(cls, cls, adj, args[10]), args[11])
    assert (out.double() - gold).abs().max().item() <= 2e-6


@pytest.mark.slow
def test_op_compiled_through_backend_decomposition():
    lay = L.SequenceLayout.text_then_image((8, 8), (4, 4), "grat-x", text_len=21, text_valid=15)
    _check_compiled(lay, valid=False, hkv=2, d=16)


@pytest.mark.slow
@pytest.mark.parametrize("valid,hkv,d,dtype", [(True, 1, 12, torch.float32), (True, 2, 64, torch.bfloat16),
                                               (False, 1, 80, torch.float32)])
def test_op_compiled_variants(valid, hkv, d, dtype):
    lay = L.SequenceLayout.image_then_text((8, 8), (4, 4), "grat-b", text_len=9, text_valid=6)
    _check_compiled(lay, valid=valid, hkv=hkv, d=d, dtype=dtype)


def test_decompositions_only_when_op_present():
    gm = torch.fx.symbolic_trace(lambda x: x + 1)
    assert ops.decompositions_for(gm) == {} or torch.ops.fxdit.grouped_attention.default not in ops.decompositions_for(
        gm)
    assert ops.inductor_patches_for(gm) == {}


# --------------------------------------------------------------------------------------------- block tables
#
# The tables are authoritative: a listed *full* block is computed without the element mask, a listed *partial* block
# with it, an unlisted block is skipped. fxdit always builds tables consistent with the adjacency; these tests give
# inconsistent ones on purpose, so a path that ignored the tables (masking element-wise everywhere) or applied the
# element mask inside full blocks would fail. Classes and adjacency are drawn here (8 tokens per class, random
# adjacency), independent of grat_layout.

_BS = 16


def _block_setup(seq=80, classes_of=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    cls = torch.arange(seq, dtype=torch.int32) // classes_of
    n = int(cls.max()) + 1
    adj = torch.rand(n, n, generator=g) < 0.45
    adj[torch.arange(n), torch.arange(n)] = True
    elem = _element_mask(cls, cls, adj)
    nb = -(-seq // _BS)
    pad = torch.zeros(nb * _BS, nb * _BS, dtype=torch.bool)
    pad[:seq, :seq] = elem
    visible = pad.view(nb, _BS, nb, _BS).sum((1, 3))
    full, partial = visible == _BS * _BS, (visible > 0) & (visible < _BS * _BS)
    assert full.any() and partial.any()
    return cls, adj, elem, full, partial


def _encode(flags):
    """BlockMask tables from block flags ``[Qb, Kb]``: ``num [1, 1, Qb]``, ``indices [1, 1, Qb, Kb]`` (listed ids
    ascending, then the unlisted ones)."""
    num = flags.sum(-1).to(torch.int32)
    idx = torch.argsort((~flags).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return num[None, None].contiguous(), idx[None, None].contiguous()


def _expand(flags, seq):
    return flags.repeat_interleave(_BS, 0).repeat_interleave(_BS, 1)[:seq, :seq]


def _table_cases(cls, elem, full, partial):
    """``(name, full_flags, partial_flags, mask the tables define)`` for the two inconsistent-table cases."""
    seq = cls.numel()
    qb, kb = torch.meshgrid(torch.arange(full.shape[0]), torch.arange(full.shape[1]), indexing="ij")
    # (a) omit listed blocks that the adjacency allows: every third block (the rest stay listed)
    drop = (qb + 2 * kb) % 3 == 0
    omit_full, omit_partial = full & ~drop, partial & ~drop
    omit_mask = elem & _expand(omit_full | omit_partial, seq)
    assert (elem & ~omit_mask).any()
    # (b) promote every other partial block to FULL: its masked-out elements become visible
    promote = partial & ((qb + kb) % 2 == 0)
    assert promote.any()
    prom_full, prom_partial = full | promote, partial & ~promote
    prom_mask = elem | _expand(promote, seq)
    assert (prom_mask & ~elem).any()
    return [("omitted", omit_full, omit_partial, omit_mask), ("promoted", prom_full, prom_partial, prom_mask)]


def _check_follows_tables(run, *, valid, hkv=1, rtol_err=2e-6):
    cls, adj, elem, full, partial = _block_setup()
    seq = cls.numel()
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 2, seq, 16, generator=g)
    k = torch.randn(2, hkv, seq, 16, generator=g)
    v = torch.randn(2, hkv, seq, 16, generator=g)
    kv_valid = torch.rand(2, seq, generator=g) > 0.2 if valid else None
    valid_mask = torch.ones(2, 1, 1, seq, dtype=torch.bool) if kv_valid is None else kv_valid[:, None, None, :]
    for name, f_flags, p_flags, mask in _table_cases(cls, elem, full, partial):
        kv_num, kv_idx = _encode(p_flags)
        f_num, f_idx = _encode(f_flags)
        out = run(q, k, v, cls, cls, adj, kv_num, kv_idx, f_num, f_idx, kv_valid, 0.25).double()
        gold = _gold(q, k, v, mask[None, None] & valid_mask, 0.25)
        adjacency = _gold(q, k, v, elem[None, None] & valid_mask, 0.25)
        assert (out - gold).abs().max().item() <= rtol_err, name
        assert (out - adjacency).abs().max().item() > 1e-2, name  # the tables changed the result


@pytest.mark.parametrize("valid,hkv", [(False, 2), (True, 1)])
def test_triton_kernel_follows_block_tables(valid, hkv):
    def run(q, k, v, qg, kg, adj, kv_num, kv_idx, f_num, f_idx, kv_valid, scale):
        return grouped_attention(q, k, v, qg, kg, adj, kv_num, kv_idx, f_num, f_idx, kv_valid, scale=scale,
                                 block_size=_BS, check_values=True)

    _check_follows_tables(run, valid=valid, hkv=hkv)


def test_compiled_flex_lowering_follows_block_tables():
    """The CPU lowering (inductor's compiled FlexAttention; eager FlexAttention evaluates the mask everywhere and
    ignores the tables, so only the compiled path is checked here). One compile serves both cases: the tables are
    graph inputs."""
    from torch._inductor.kernel.flex.flex_cpu import check_cpu_supported

    if not check_cpu_supported():
        pytest.skip("inductor's C++ FlexAttention template needs AVX2: the op lowers to the dense formula here")
    compiled = {}

    def run(q, k, v, qg, kg, adj, kv_num, kv_idx, f_num, f_idx, kv_valid, scale):
        def fn(q, k, v, qg, kg, adj, a, b, c, e):
            return torch.ops.fxdit.grouped_attention(q, k, v, qg, kg, adj, a, b, c, e, None, scale, _BS)

        args = (q, k, v, qg, kg, adj, kv_num, kv_idx, f_num, f_idx)
        if "fn" not in compiled:
            compiled["fn"] = _compile_with_backend_decompositions(fn, args)
        out = compiled["fn"](*args)
        return out[0] if isinstance(out, (list, tuple)) else out

    _check_follows_tables(run, valid=False, hkv=2, rtol_err=1e-5)


_AOT_SCRIPT = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fxdit.kernels.grouped_attention import _grouped_attention_fwd_kernel as k
dt, cap = sys.argv[1], int(sys.argv[2])
bm, bn, dpad, bs = map(int, sys.argv[3:7])
valid, ieee = sys.argv[7] == "1", sys.argv[8] == "1"
ptr = {n: "*" + dt for n in ("Q", "K", "V", "Out")}
ptr.update({n: "*i32" for n in ("QG", "KG", "KV_NUM", "KV_IDX", "FULL_NUM", "FULL_IDX")}, ADJ="*i8", KVV="*i8")
const = dict(BLOCK_SIZE=bs, D_PAD=dpad, DV_PAD=dpad, HAS_VALID=valid, DOT_FP32=False, IEEE=ieee, BLOCK_M=bm, BLOCK_N=bn)
sig = {n: ptr.get(n, "constexpr" if n in const else ("fp32" if n == "qk_scale" else "i32")) for n in k.arg_names}
src = ASTSource(fn=k, signature=sig, constexprs={(k.arg_names.index(n),): v for n, v in const.items()})
opts = {"num_warps": 8 if bm == 128 else 4, "num_stages": 2}
c = triton.compile(src, target=GPUTarget("cuda", cap, 32), options=opts)
assert c.asm["cubin"]
"""


@pytest.mark.parametrize("dt,cap,bm,bn,dpad,bs,valid,ieee", [
    ("fp16", 90, 128, 64, 64, 128, 1, 0),
    pytest.param("bf16", 80, 64, 32, 128, 64, 0, 0, marks=pytest.mark.slow),
    pytest.param("fp32", 90, 64, 64, 16, 64, 1, 1, marks=pytest.mark.slow),
])
def test_triton_kernel_compiles_for_gpu_targets(dt, cap, bm, bn, dpad, bs, valid, ieee):
    """No GPU here: compile the real (non-interpreted) kernel ahead of time to a cubin for sm_80/sm_90."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-W", "ignore", "-c", _AOT_SCRIPT, dt, str(cap), str(bm), str(bn), str(dpad),
                          str(bs), str(valid), str(ieee)], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]


def test_dense_lowering_reasons():
    """When the compiled CPU path is the dense formula, the kernel layer says why; CUDA and fp32/bf16/fp16 CPU (on a
    CPU with the flex template) lower to a block-sparse kernel."""
    from fxdit.kernels import torch_private

    f32, f64, bf16 = torch.float32, torch.float64, torch.bfloat16
    assert ops.grouped_attention_dense_lowering("cuda", f64, f64, f64) is None
    assert "not torch.float64" in ops.grouped_attention_dense_lowering("cpu", f64, f64, f64)
    assert "one dtype" in ops.grouped_attention_dense_lowering("cpu", f32, bf16, f32)
    sparse = ops.grouped_attention_dense_lowering("cpu", f32, f32, f32)
    if torch_private.cpu_flex_supported():
        assert sparse is None
    else:  # pragma: no cover - a CPU without the template's instruction set
        assert "not supported on this CPU" in sparse


def test_materialize_op():
    x = torch.rand(3, 5) > 0.5
    y = torch.ops.fxdit.materialize(x.t())
    assert torch.equal(y, x.t()) and y.is_contiguous() and y.data_ptr() != x.data_ptr()
    torch.library.opcheck(torch.ops.fxdit.materialize, (torch.randn(4, 6),))
