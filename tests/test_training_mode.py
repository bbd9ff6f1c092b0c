"""Training mode / autograd: a graph that needs gradients is compiled as plain inductor would compile it.

Grouped attention and caching are inference rewrites. When the graph Dynamo hands over needs gradients, the
backend runs only the analysis passes (warning once), reports the rewriting passes as left out, and gradients
flow and equal eager's (and plain inductor's). Opting in to grouped attention under gradients
(``attention.allow_grad=True``) is refused with an ``FxditError`` naming the field.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import fxdit
from fxdit import backend
from fxdit.apps import models
from fxdit.errors import FxditError

LOSSY = {"attention": {"mode": "grat-b", "group": (2, 2), "min_tokens": 0}}


def _spec():
    spec = models.build("dit-tiny", depth=1, input_size=(8, 8), batch=2)
    # adaLN-Zero starts with zero modulation/output layers (zero output, zero gradients): re-draw every parameter
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in spec.model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (p[0].numel() ** -0.5 if p.dim() >= 2 else 0.1))
    return spec


def _loss(out) -> torch.Tensor:
    return models.output_tensor(out).square().mean()


def _grads(model, fn, spec) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    x = spec.args[0].clone().requires_grad_(True)
    loss = _loss(fn(x, *spec.args[1:], **spec.kwargs))
    loss.backward()
    return loss.detach(), {"input": x.grad.clone(), **{n: p.grad.clone() for n, p in model.named_parameters()
                                                         if p.grad is not None}}


def _lossy_reports(compiled) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for rec in fxdit.reports(compiled):
        for rep in rec.reports:
            out.setdefault(rep.name, {})
            for k, v in rep.skipped.items():
                out[rep.name][k] = out[rep.name].get(k, 0) + v
    return out


@pytest.fixture
def fresh_warning(monkeypatch):
    monkeypatch.setattr(backend, "_warned", set())


def test_training_graph_is_left_to_autograd_and_gradients_match_eager(no_inductor, fresh_warning):
    spec = _spec()
    model = spec.model.train()
    ref_loss, ref = _grads(model, model, spec)
    compiled = torch.compile(model, backend="fxdit", options={**LOSSY, "on_pass_error": "raise"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss, got = _grads(model, compiled, spec)
        loss2, got2 = _grads(model, compiled, spec)  # a second call: no second warning
    grad_warnings = [w for w in caught if "needs gradients" in str(w.message)]
    assert len(grad_warnings) == 1
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert got.keys() == ref.keys() and len(ref) > 2
    assert all(bool(g.abs().sum() > 0) for g in ref.values())  # every gradient carries signal
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(got2[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)
    skipped = _lossy_reports(compiled)
    assert skipped["rewrite_grouped_attention"] == {backend.GRAD_LEFT_OUT: len(fxdit.reports(compiled))}
    assert skipped["plan_cache"] == {backend.GRAD_LEFT_OUT: len(fxdit.reports(compiled))}
    assert torch._dynamo.utils.counters["fxdit"]["rewrite_grouped_attention"] == 0
    # the analysis still ran: the sites and blocks are in the report
    assert sum(r.summary["attention_sites"] for r in fxdit.reports(compiled)) == spec.expected.attention_sites


def test_same_model_under_no_grad_is_rewritten(no_inductor):
    """The control for the test above: the same options do rewrite when no gradient is needed."""
    spec = _spec()
    compiled = torch.compile(spec.model, backend="fxdit", options={**LOSSY, "on_pass_error": "raise"})
    with torch.no_grad():
        compiled(*spec.args, **spec.kwargs)
    assert torch._dynamo.utils.counters["fxdit"]["rewrite_grouped_attention"] == spec.expected.attention_sites
    assert backend.GRAD_LEFT_OUT not in _lossy_reports(compiled).get("rewrite_grouped_attention", {})


def test_requires_grad_inputs_in_eval_mode_count_as_training(no_inductor, fresh_warning):
    spec = _spec()  # eval mode, but the parameters require grad and grad mode is on
    compiled = torch.compile(spec.model, backend="fxdit", options=LOSSY)
    with pytest.warns(UserWarning, match="needs gradients"):
        out = compiled(*spec.args, **spec.kwargs)
    assert models.output_tensor(out).requires_grad
    assert torch._dynamo.utils.counters["fxdit"]["rewrite_grouped_attention"] == 0


def _causes(exc: BaseException) -> list[BaseException]:
    chain = []
    while exc is not None:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def test_grat_opt_in_under_gradients_is_refused(no_inductor):
    spec = _spec()
    options = {"attention": {**LOSSY["attention"], "allow_grad": True}}
    compiled = torch.compile(spec.model.train(), backend="fxdit", options=options)
    with pytest.raises(Exception) as info:
        compiled(*spec.args, **spec.kwargs)
    errors = [e for e in _causes(info.value) if isinstance(e, FxditError)]
    assert errors, f"expected an FxditError in {_causes(info.value)}"
    assert "attention.allow_grad=True" in str(errors[0]) and "expected allow_grad=False" in str(errors[0])
    # the opt-in costs nothing where no gradient is needed
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(spec.model.eval(), backend="fxdit", options=options)
        compiled(*spec.args, **spec.kwargs)


@pytest.mark.slow
def test_gradients_equal_plain_inductor():
    spec = _spec()
    model = spec.model.train()
    _, eager = _grads(model, model, spec)
    torch._dynamo.reset()
    _, plain = _grads(model, torch.compile(model, backend="inductor"), spec)
    torch._dynamo.reset()
    _, ours = _grads(model, torch.compile(model, backend="fxdit", options=LOSSY), spec)
    for name in eager:
        torch.testing.assert_close(ours[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(ours[name], eager[name], rtol=1e-3, atol=1e-5, msg=name)
