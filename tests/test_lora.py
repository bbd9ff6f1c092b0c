"""Unfused PEFT LoRA layers: roles and caching see through them; fusing a LoRA invalidates factors calibrated before.

An unfused LoRA linear computes ``base(x) + lora_B(lora_A(dropout(x))) · scale``. ``find_blocks`` recognises the
pattern from the dataflow (``find_adapters``) and gives the base linear the role of the sum and the adapter pair
``"other"``, so the roles are those of the model without the adapter and ICC caches the same layers (the base
increment with the base's factors, the adapter product exactly: the effective weight ``W + scale·B·A``).
"""

from __future__ import annotations

import pytest
import torch

import fxdit
from fxdit.analysis import analyze
from fxdit.apps import models
from fxdit.errors import FxditError

peft = pytest.importorskip("peft")
pytest.importorskip("diffusers")

#: Module-name suffixes PEFT wraps in the tiny models (attention projections and both MLP linears).
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "net.0.proj", "net.2"]


def _lora_config(rank: int = 4, **kw):
    # init_lora_weights=False: lora_B is random, not zero, so the adapter changes the output.
    return peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False, **kw)


def _roles(model, spec) -> list[tuple[int, str, str]]:
    """(block, module without PEFT's ``.base_layer``, role) of every non-adapter linear."""
    out = []
    with torch.no_grad():
        for g in analyze(model, *spec.args, **spec.kwargs):
            for b in g.blocks:
                for lin in b.linears:
                    if lin.adapter_of is None:
                        out.append((b.index, lin.module.replace(".base_layer", ""), lin.role))
    return out


def _adapter_infos(model, spec):
    with torch.no_grad():
        graphs = analyze(model, *spec.args, **spec.kwargs)
    return [lin for g in graphs for b in g.blocks for lin in b.linears]


@pytest.mark.parametrize("name, how", [("sd3", "add_adapter"), ("diffusers-dit", "inject")])
def test_lora_roles_equal_the_roles_without_it(name, how):
    spec = models.build(name)
    before = _roles(spec.model, spec)
    if how == "add_adapter":  # diffusers' PeftAdapterMixin
        spec.model.add_adapter(_lora_config())
    else:  # any nn.Module (DiTTransformer2DModel has no add_adapter)
        peft.inject_adapter_in_model(_lora_config(), spec.model)
    spec.model.eval()
    after = _roles(spec.model, spec)
    assert after == before
    assert {r for _, _, r in before} >= {"q", "k", "v", "attn_out", "mlp_in", "mlp_out"}
    infos = _adapter_infos(spec.model, spec)
    adapted = [i for i in infos if i.adapters]
    adapters = [i for i in infos if i.adapter_of is not None]
    wrapped = {n for n, m in spec.model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert {i.module.removesuffix(".base_layer") for i in adapted} == wrapped
    assert len(adapters) == 2 * len(adapted)
    assert all(i.role == "other" and ".lora_" in i.module for i in adapters)
    by_node = {i.node: i for i in infos}
    assert all(by_node[i.adapter_of].adapters for i in adapters)


def test_two_active_adapters_on_one_linear():
    spec = models.build("sd3")
    before = _roles(spec.model, spec)
    spec.model.add_adapter(_lora_config(), adapter_name="a")
    spec.model.add_adapter(_lora_config(rank=2), adapter_name="b")
    spec.model.set_adapters(["a", "b"], weights=[1.0, 0.5])
    spec.model.eval()
    assert _roles(spec.model, spec) == before
    infos = _adapter_infos(spec.model, spec)
    assert all(len(i.adapters) == 4 for i in infos if i.adapters)  # two (down, up) pairs per adapted linear


def test_a_low_rank_pair_not_added_to_a_base_linear_is_not_an_adapter():
    from fxdit.passes.find_blocks import find_adapters

    class Bottleneck(torch.nn.Module):  # x -> down -> up, no base linear beside it: an ordinary layer pair
        def __init__(self):
            super().__init__()
            self.down, self.up = torch.nn.Linear(16, 4), torch.nn.Linear(4, 16)
            self.other = torch.nn.Linear(16, 16)

        def forward(self, x):
            return self.other(x) + self.up(self.down(x * 2.0)) * 0.5  # down reads 2x, not x

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(Bottleneck(), backend=backend)(torch.randn(2, 5, 16))
    assert find_adapters(graphs[0]) == []


def _make_exact_lowrank(model, factors):
    with torch.no_grad():
        for key in factors.keys():
            a, b = factors.get(key)
            model.get_submodule(key).weight.copy_(a @ b)


def test_unfused_lora_compiles_and_icc_stays_exact(no_inductor):
    """Rank-4 factors of base weights that *are* rank 4: the increment is exact, so every cached step must equal
    eager on moving inputs — which holds only if the adapter runs exactly beside the base's increment."""
    spec = models.build("sd3", batch=2)
    model = spec.model
    model.add_adapter(_lora_config())
    model.eval()
    example = (spec.args, spec.kwargs)
    _make_exact_lowrank(model, fxdit.calibrate(model, method="svd", rank=4, example=example, progress=False))
    factors = fxdit.calibrate(model, method="svd", rank=4, example=example, progress=False)
    assert factors.keys() and not any(".lora_" in k for k in factors.keys())
    assert any(k.endswith("net.0.proj.base_layer") for k in factors.keys())  # MLP layers keep their roles
    fast = torch.compile(model, backend="fxdit", options={"on_pass_error": "raise", "cache": {
        "factors": factors, "schedule": {"period": 2}}})
    x = spec.args[0]
    with torch.no_grad(), fxdit.sampling(fast, calls_per_step=1):
        for step in range(4):
            args = (x + 0.1 * step * torch.randn_like(x),)
            out = models.output_tensor(fast(*args, **spec.kwargs))
            ref = models.output_tensor(model(*args, **spec.kwargs))
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    records = fxdit.reports(fast)
    plans = [r.report("plan_cache").details for r in records]
    assert sum(p.get("planned", 0) - p.get("exact", 0) for p in plans) == len(factors)
    assert {"mlp_in", "mlp_out", "q", "attn_out"} <= {role for p in plans for role in p.get("roles", ())}
    assert any(r.runtime is not None and r.runtime.stats.cached_calls > 0 for r in records)
    assert sum(r.report("find_blocks").details.get("adapters", 0) for r in records) > 0


def test_fused_lora_is_refused_with_recalibrate(no_inductor):
    spec = models.build("sd3")
    model = spec.model
    model.add_adapter(_lora_config())
    model.eval()
    factors = fxdit.calibrate(model, method="svd", rank=4, example=(spec.args, spec.kwargs), progress=False)
    factors.verify_model(model)  # unfused: the base weights are the calibrated ones
    model.fuse_lora(lora_scale=1.0)  # W <- W + scale·B·A in the base layers
    with pytest.raises(FxditError, match="recalibrate"):
        factors.verify_model(model)
    fast = torch.compile(model, backend="fxdit", options={"cache": {"factors": factors}})
    with pytest.raises(Exception) as info, torch.no_grad():
        fast(*spec.args, **spec.kwargs)
    chain, err = [], info.value
    while err is not None:
        chain.append(err)
        err = err.__cause__
    fx_errors = [e for e in chain if isinstance(e, FxditError)]
    assert fx_errors and "recalibrate" in str(fx_errors[0])
