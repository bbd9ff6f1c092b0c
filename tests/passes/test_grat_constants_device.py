"""The grouped-attention rewrite lifts its index vectors and block tables on the device of the attention's tensors.

A CUDA model's graph is traced with CUDA tensors; tables built on the CPU and handed to ``index_select`` or to the
Triton launcher with CUDA activations fail at compile or launch time. Without a GPU the device of the sites is set
to ``meta`` in the traced metadata: every constant the pass lifts must follow it.
"""

from __future__ import annotations

import pytest
import torch
from fxdit.passes._fx_utils import fresh_copy, fxdit_meta
from fxdit.passes.pipeline import find_attention, find_blocks
from fxdit.passes.rewrite_grouped_attention import rewrite_grouped_attention

from fxdit.config import FxditConfig
from fxdit.models.dit import DiT, DiTConfig


def _captured():
    cfg = DiTConfig(depth=2, hidden=32, heads=2, input_size=(16, 16), num_classes=4)
    torch.manual_seed(0)
    model = DiT(cfg).eval()
    args = (torch.randn(1, cfg.in_channels, 16, 16), torch.tensor([3.0]), torch.tensor([1]))
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=record, fullgraph=True)(*args)
    torch._dynamo.reset()
    (gm,) = graphs
    return gm


@pytest.mark.parametrize("hoist", [True, False])
def test_lifted_tables_follow_the_sites_device(hoist):
    options = {"attention": {"mode": "grat-b", "group": (4, 4), "min_tokens": 0}, "on_pass_error": "raise"}
    cfg = FxditConfig.from_options(options)
    gm = _captured()
    find_attention(gm, cfg)
    find_blocks(gm, cfg)
    work = fresh_copy(gm)
    if not hoist:
        fxdit_meta(work)["token_grid"].patch_node = None
    sdpa = [n for n in work.graph.nodes if n.op == "call_function" and "scaled_dot_product_attention" in str(n.target)]
    assert sdpa
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
