"""GPU tests: fxdit's Triton kernels compiled for CUDA, the CUDA dispatch of the ops, and one model end to end.

* ``fxdit.kernels.grouped_attention`` with autotuning as shipped (real ``BLOCK_M``/``BLOCK_N`` tiles, fp16/bf16
  ``tl.dot``), fp16/bf16/fp32, head dims 40..128, ragged and padded text, video, GQA, key-validity masks, raster
  (partial-block) layouts, empty rows, block sizes 16..128; against an fp64 oracle built from the BlockMask tables.
* ``fxdit.kernels.lowrank_increment`` at DiT-XL width, ragged shapes, rank chunking, strided inputs; against
  ``y_c + (x − x_c)·Bᵀ·Aᵀ`` in fp64.
* Pass rule (flex_attention's ``_check_equal``): ``err(kernel) ≤ 2·err(same-dtype reference) + eps``.
* ``torch.ops.fxdit.*`` on CUDA tensors (eager and under ``torch.compile``), and the reference DiT with GRAT-B and
  ICC through ``torch.compile(backend="fxdit")`` with inductor, against an eager oracle.

Run with the real Triton compiler: ``TRITON_INTERPRET=0 python -m pytest -q -m gpu tests/gpu`` (``tests/conftest.py``
defaults ``TRITON_INTERPRET`` to 1 for the CPU suite; an explicit 0 wins). ``tools/gpu_check.sh`` does this. The
numeric core lives in ``_gpu_checks.py`` and takes a device, so its oracles can be dry-run on CPU.
"""

from __future__ import annotations

import os

import _gpu_checks as C
import fxdit.kernels.ops  # noqa: F401  (registers torch.ops.fxdit.*)
import pytest
import torch

pytestmark = pytest.mark.gpu

DEVICE = "cuda"


@pytest.fixture(autouse=True)
def _compiled_triton_exact_fp32():
    if C.interpreting():
        pytest.skip("GPU kernel tests need the Triton compiler: run them with TRITON_INTERPRET=0")
    with C.exact_fp32():
        yield
    torch.cuda.synchronize()


def _dt_id(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def test_environment_is_cuda():
    """Guards the run itself: CUDA is present and the kernels are not interpreted."""
    assert torch.cuda.is_available()
    assert os.environ.get("TRITON_INTERPRET", "0") != "1"


# Tests run in file order, most informative first, so that a run cut short by a time limit still reports the
# kernels: low-rank increment (quick), grouped attention, the ops' CUDA dispatch, then end to end.

# ---------------------------------------------------------------------------------------------------------------
# low-rank increment
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=_dt_id)
@pytest.mark.parametrize("name", list(C.LOWRANK_CASES))
def test_lowrank_increment_kernel(name, dtype):
    C.check_lowrank(C.LOWRANK_CASES[name], dtype, DEVICE, via="kernel")


# ---------------------------------------------------------------------------------------------------------------
# grouped attention
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,dtype", C.ATTN_GPU_MATRIX, ids=[f"{n}-{_dt_id(d)}" for n, d in C.ATTN_GPU_MATRIX])
def test_grouped_attention_kernel(name, dtype):
    C.check_attention(C.ATTN_CASES[name], dtype, DEVICE, via="kernel")


def test_grouped_attention_autotune_picks_real_tiles():
    """At block size 128 the autotuner has chosen one of the shipped 64/128-row configurations."""
    from fxdit.kernels import grouped_attention as ga

    C.check_attention(C.ATTN_CASES["img64_b_text77"], torch.bfloat16, DEVICE)
    best = getattr(ga._grouped_attention_fwd_tuned, "best_config", None)
    assert best is not None, "the autotuner did not run"
    assert best.kwargs["BLOCK_M"] in (64, 128) and best.kwargs["BLOCK_N"] in (32, 64), best


def test_grouped_attention_repeatable():
    """Two calls with the tuned configuration give bit-identical results."""
    x = C.attention_inputs(C.ATTN_CASES["video_b_valid"], torch.bfloat16, DEVICE)
    assert torch.equal(C.run_attention(x, "kernel"), C.run_attention(x, "kernel"))


# ---------------------------------------------------------------------------------------------------------------
# the ops' CUDA dispatch
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,dtype", [("img64_b_text77", torch.bfloat16), ("img64_b_e2e", torch.float32),
                                        ("img16x32_b_bs32_dv", torch.float16)])
def test_grouped_attention_op_cuda_dispatch(name, dtype):
    """``torch.ops.fxdit.grouped_attention`` on CUDA tensors runs the Triton kernel (same result as the launcher)."""
    with C.count_triton_launches() as launches:
        C.check_attention(C.ATTN_CASES[name], dtype, DEVICE, via="op")
    assert launches["grouped_attention"] == 1
    x = C.attention_inputs(C.ATTN_CASES[name], dtype, DEVICE)
    assert torch.equal(C.run_attention(x, "op"), C.run_attention(x, "kernel"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=_dt_id)
def test_lowrank_increment_op_cuda_dispatch(dtype):
    with C.count_triton_launches() as launches:
        C.check_lowrank(C.LOWRANK_CASES["ditxl_r128"], dtype, DEVICE, via="op")
    assert launches["lowrank_increment"] == 1


def test_grouped_attention_op_under_inductor():
    """Under plain inductor the CUDA op stays opaque (Triton kernel) and the graph compiles around it."""
    x = C.attention_inputs(C.ATTN_CASES["img24_x_bs64_gqa"], torch.float16, DEVICE)

    def f(q, k, v):
        out = torch.ops.fxdit.grouped_attention(q * 1.0, k, v, x.cls, x.cls, x.adj, *x.tables, x.kv_valid, x.scale,
                                                x.block_size)
        return out * 2.0

    eager = f(x.q, x.k, x.v)
    with C.count_triton_launches() as launches:
        out = torch.compile(f, backend="inductor", fullgraph=True, dynamic=False)(x.q, x.k, x.v)
    assert launches["grouped_attention"] >= 1
    torch.testing.assert_close(out, eager, atol=0, rtol=0)


def test_lowrank_increment_op_under_inductor():
    x = C.lowrank_inputs(C.LOWRANK_CASES["mlp_in_r37"], torch.bfloat16, DEVICE)

    def f(a, ac, yc):
        return torch.ops.fxdit.lowrank_increment(a, ac, yc, x.B, x.A) * 2.0

    eager = f(x.x, x.x_cached, x.y_cached)
    with C.count_triton_launches() as launches:
        out = torch.compile(f, backend="inductor", fullgraph=True, dynamic=False)(x.x, x.x_cached, x.y_cached)
    assert launches["lowrank_increment"] >= 1
    torch.testing.assert_close(out, eager, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grat,icc", [(False, True), (True, True)], ids=["icc_only", "grat_b+icc"])
def test_reference_dit_end_to_end(tmp_path, grat, icc):
    """The reference DiT (77 joint text tokens + 64×64 image tokens = 4173, not a multiple of the 128-token block;
    16×16 groups, head dim 72, exactly rank-16 block weights, fp32) on CUDA through ``torch.compile(backend="fxdit")``
    + inductor, 4 steps at period 2, every step against the eager oracle.

    ``icc_only`` isolates the caching path, so that a GRAT failure on CUDA does not hide the state of ICC.
    """
    steps = 4
    res = C.dit_end_to_end(DEVICE, grat=grat, icc=icc, steps=steps, text_tokens=77, dump_dir=str(tmp_path / "dump"))
    depth, full, cached = 2, steps // 2, steps // 2
    assert res.schedule == [True, False] * full, res.schedule
    assert res.planned > 0
    ops = res.dumped_ops
    # the cached variant holds the increments, and every cached step runs each of them on the Triton kernel
    assert ops["lowrank_increment@icc_cached"] > 0 and ops["lowrank_increment@icc_full"] == 0, ops
    assert res.triton_calls["lowrank_increment"] == ops["lowrank_increment@icc_cached"] * cached, (res, ops)
    if grat:
        assert res.rewritten == depth
        # attention is computed exactly at every step, full or cached, on the Triton kernel
        assert ops["grouped_attention@icc_full"] == depth and ops["grouped_attention@icc_cached"] == depth, ops
        assert res.triton_calls["grouped_attention"] == depth * steps, res.triton_calls
        # the grouped pattern changes the output: the comparison with the oracle has teeth
        assert min(res.rel_dense) > 1e-3, res.rel_dense
    else:
        assert res.triton_calls["grouped_attention"] == 0
    # fp32 end to end (IEEE dots in both kernels, no TF32): rounding-level agreement with the oracle
    assert max(res.rel_err) < 2e-4, res
    assert min(res.psnr_db) > 70.0, res
