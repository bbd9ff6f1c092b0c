"""fxdit::lowrank_increment: Triton kernel (interpreter on CPU), the CPU op and its inductor decomposition against an
fp64 golden value computed here (``y_c + (x − x_c)·Bᵀ·Aᵀ``); op registration and fake strides."""

import fxdit.kernels.lowrank_increment as lk
import pytest
import torch
from fxdit.kernels import ops
from fxdit.kernels.reference import lowrank_increment_ref
from torch._subclasses.fake_tensor import FakeTensorMode

_EPS = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def _inputs(lead, k, n, r, dtype, *, noncontig=False):
    g = torch.Generator().manual_seed(1000 * k + 10 * n + r)
    x = torch.randn(*lead, k, generator=g).to(dtype)
    xc = (x.float() + 0.3 * torch.randn(*lead, k, generator=g)).to(dtype)
    yc = torch.randn(*lead, n, generator=g).to(dtype)
    B = (torch.randn(r, k, generator=g) / k**0.5).to(dtype)
    A = (torch.randn(n, r, generator=g) / r**0.5).to(dtype)
    if noncontig:  # transposed factors, strided activations
        B = B.t().contiguous().t()
        A = A.t().contiguous().t()
        x = torch.cat([x, x], dim=-1)[..., ::2]
        xc = torch.cat([xc, xc], dim=-1)[..., 1::2]
    return x, xc, yc, B, A


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _golden(x, xc, yc, B, A):
    """``y_c + (x − x_c)·Bᵀ·Aᵀ`` in fp64, written out here (independent of fxdit's reference)."""
    d = x.double() - xc.double()
    return yc.double() + (d @ B.double().t()) @ A.double().t()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rank", [1, 3, 8])
@pytest.mark.parametrize("shape", [((2, 5), 33, 70), ((7,), 16, 16), ((1, 3, 2), 65, 9)])
def test_triton_matches_reference(dtype, rank, shape):
    lead, k, n = shape
    args = _inputs(lead, k, n, rank, dtype)
    golden = _golden(*args)
    ref = lowrank_increment_ref(*args)
    out = lk.lowrank_increment(*args)
    assert out.shape == golden.shape and out.dtype == dtype and out.is_contiguous()
    eps = 4 * _EPS[dtype] * golden.abs().max().item()
    assert _err(out, golden) <= 2 * _err(ref, golden) + eps


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_noncontiguous_and_rank_chunks(dtype, monkeypatch):
    # rank 9 with a 4-wide rank chunk exercises the chained launches (as ranks > 256 do on a GPU)
    monkeypatch.setattr(lk, "_MAX_BLOCK_R", 4)
    args = _inputs((3, 4), 20, 12, 9, dtype, noncontig=True)
    assert not args[0].is_contiguous() and not args[3].is_contiguous()
    golden = _golden(*args)
    ref = lowrank_increment_ref(*args)
    out = lk.lowrank_increment(*args)
    eps = 4 * _EPS[dtype] * golden.abs().max().item()
    assert _err(out, golden) <= 2 * _err(ref, golden) + eps


def test_zero_increment_returns_cache():
    x, _, yc, B, A = _inputs((2, 3), 8, 5, 3, torch.float32)
    assert torch.equal(lk.lowrank_increment(x, x.clone(), yc, B, A), yc)


@pytest.mark.parametrize("bad", ["dtype_mix", "int", "shape_x", "shape_b", "shape_a", "shape_y", "cpu"])
def test_launcher_validates(bad, monkeypatch):
    x, xc, yc, B, A = _inputs((2, 3), 8, 5, 3, torch.float32)
    if bad == "dtype_mix":
        A = A.half()
    elif bad == "int":
        x, xc, yc, B, A = (t.to(torch.int32) for t in (x, xc, yc, B, A))
    elif bad == "shape_x":
        xc = xc[:, :2]
    elif bad == "shape_b":
        B = B[:, :7]
    elif bad == "shape_a":
        A = A[:, :2]
    elif bad == "shape_y":
        yc = yc[..., :4]
    elif bad == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError):
        lk.lowrank_increment(x, xc, yc, B, A)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("noncontig", [False, True])
def test_op_cpu_matches_fp64_golden(dtype, noncontig):
    args = _inputs((2, 5), 12, 7, 3, dtype, noncontig=noncontig)
    out = torch.ops.fxdit.lowrank_increment(*args)
    golden = _golden(*args)
    assert out.shape == golden.shape and out.dtype == dtype and out.is_contiguous()
    # fp32 accumulation, one rounding to the output dtype at the end
    bound = (2 * _EPS[dtype] + 64 * _EPS[torch.float32]) * golden.abs().max().item()
    assert _err(out, golden) <= bound
    # the increment is really applied: the output is far from y_c
    assert _err(out, args[2]) > 10 * bound


def test_op_registration_opcheck():
    args = _inputs((2, 5), 12, 7, 3, torch.float32, noncontig=True)
    torch.library.opcheck(torch.ops.fxdit.lowrank_increment.default, args,
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("noncontig", [False, True])
def test_fake_strides_match_real(noncontig):
    args = _inputs((2, 3, 4), 10, 6, 5, torch.float32, noncontig=noncontig)
    real = torch.ops.fxdit.lowrank_increment(*args)
    with FakeTensorMode() as mode:
        fake_args = tuple(mode.from_tensor(t) for t in args)
        fake = torch.ops.fxdit.lowrank_increment(*fake_args)
    assert fake.shape == real.shape and fake.stride() == real.stride() and fake.dtype == real.dtype


def test_decomposition_equals_reference():
    """Under fxdit's lowering on CPU the op decomposes to aten (no call back into the custom op)."""
    from torch._inductor.utils import run_and_get_code

    from fxdit.backend import lower
    from fxdit.config import FxditConfig

    def f(x, xc, yc, B, A):
        return torch.ops.fxdit.lowrank_increment(x, xc, yc, B, A) * 2.0

    def backend(gm, example_inputs):
        assert ops._lowrank_increment_decomp in ops.decompositions_for(gm).values()
        return lower(gm, example_inputs, FxditConfig())

    args = _inputs((2, 5), 12, 7, 3, torch.float32)
    compiled = torch.compile(f, backend=backend, fullgraph=True)
    out, code = run_and_get_code(compiled, *args)
    torch.testing.assert_close(out.double(), 2.0 * _golden(*args), rtol=1e-5, atol=1e-5)
    assert not any("torch.ops.fxdit.lowrank_increment" in c for c in code)  # decomposed, not a fallback call
    assert any("extern_kernels.addmm" in c for c in code)


def test_decomposition_only_for_graphs_with_the_op():
    gm = torch.fx.symbolic_trace(lambda x: x + 1)
    assert torch.ops.fxdit.lowrank_increment.default not in ops.decompositions_for(gm)
