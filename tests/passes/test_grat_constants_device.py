"""The grouped-attention rewrite lifts its index vectors and block tables on the device of the attention's tensors.

A CUDA model's graph is traced with CUDA tensors; tables built on the CPU and handed to ``index_select`` or to the
Triton launcher with CUDA activations fail at compile or launch time. Without a GPU the device of the sites is set
to ``meta`` in the traced metadata: every constant the pass lifts must follow it.
"""

from __future__ import annotations

import pytest
import torch
from _analysed import trace
from fxdit.passes._fx_utils import fresh_copy, fxdit_meta
from fxdit.passes.pipeline import find_attention, find_blocks
from fxdit.passes.rewrite_grouped_attention import rewrite_grouped_attention

from fxdit.apps.models.dit import DiT, DiTConfig
from fxdit.config import FxditConfig


def _analysed_copy(*, hoist: bool):
    """A fresh, analysed copy of a small reference DiT's graph, its GRAT config and its attention calls."""
    cfg = FxditConfig.from_options({"attention": {"mode": "grat-b", "group": (4, 4), "min_tokens": 0},
                                    "on_pass_error": "raise"})
    dit = DiTConfig(depth=2, hidden=32, heads=2, input_size=(16, 16), num_classes=4)
    torch.manual_seed(0)
    model = DiT(dit).eval()
    gm, _ = trace(model, torch.randn(1, dit.in_channels, 16, 16), torch.tensor([3.0]), torch.tensor([1]))
    find_attention(gm, cfg)
    find_blocks(gm, cfg)
    work = fresh_copy(gm)
    if not hoist:
        fxdit_meta(work)["token_grid"].patch_node = None
    sdpa = [n for n in work.graph.nodes if n.op == "call_function" and "scaled_dot_product_attention" in str(n.target)]
    assert sdpa
    return work, cfg, sdpa


@pytest.mark.parametrize("hoist", [True, False])
def test_lifted_tables_follow_the_sites_device(hoist):
    work, cfg, sdpa = _analysed_copy(hoist=hoist)
    for node in sdpa:
        for arg in node.args[:3]:
            for key in ("val", "example_value"):
                val = arg.meta.get(key)
                if isinstance(val, torch.Tensor):
                    arg.meta[key] = torch.empty(val.shape, dtype=val.dtype, device="meta")
    report = rewrite_grouped_attention(work, cfg)
    assert report.rewritten == len(sdpa)
    consts = fxdit_meta(work)["constants"]
    assert consts, "the rewrite lifted no constant"
    assert {t.device.type for t in consts.values()} == {"meta"}, {n: t.device for n, t in consts.items()}
    # one placeholder per distinct table even though each was moved
    assert len({id(t) for t in consts.values()}) == len(consts)


@pytest.mark.parametrize("head_dim,dtype,rewritten", [(16, torch.float32, True), (256, torch.float32, False),
                                                      (16, torch.float64, False)])
def test_cuda_sites_the_kernel_cannot_run_stay_dense_with_its_reason(head_dim, dtype, rewritten):
    """The pass asks the kernel first: a CUDA site with a head dim or dtype the Triton kernel does not take stays
    dense with the kernel's reason instead of failing at launch time."""
    from fxdit.kernels.ops import grouped_attention_unsupported
    from torch._subclasses.fake_tensor import FakeTensorMode

    work, cfg, sdpa = _analysed_copy(hoist=False)  # per-site rewrite: the check is per site
    with FakeTensorMode():
        for node in sdpa:
            for arg in node.args[:3]:
                for key in ("val", "example_value"):
                    val = arg.meta.get(key)
                    if isinstance(val, torch.Tensor):
                        arg.meta[key] = torch.empty((*val.shape[:-1], head_dim), dtype=dtype, device="cuda")
    expected = grouped_attention_unsupported("cuda", dtype, head_dim, head_dim)
    assert (expected is None) == rewritten
    if rewritten:
        return  # lifting tables onto a CUDA device needs one: the meta-device test above covers the move
    report = rewrite_grouped_attention(work, cfg)
    assert report.rewritten == 0
    assert dict(report.skipped) == {f"kernel: {expected}": len(sdpa)}


def test_kernel_capability_answers():
    from fxdit.kernels.ops import grouped_attention_unsupported as why

    assert why("cpu", torch.float32, 256, 256) is None  # the CPU path (FlexAttention / dense) has no head-dim limit
    assert why("cuda", torch.bfloat16, 128, 128) is None
    assert "head dims 160/160" in why("cuda", torch.float16, 160, 160)
    assert "dtype" in why("cuda", torch.float64, 64, 64)
    assert "device 'mps'" in why("mps", torch.float32, 64, 64)
    assert "floating-point" in why("cpu", torch.int32, 64, 64)
