"""The backend: registration, options validation, identity pipeline, reports, fallback."""

import importlib.metadata

import pytest
import torch

import fxdit
from fxdit.config import FxditConfig
from fxdit.errors import FxditError


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 16)

    def forward(self, x):
        q = self.lin(x)
        return torch.nn.functional.scaled_dot_product_attention(q, x, x).relu()


def test_entry_point_registered():
    eps = importlib.metadata.entry_points(group="torch_dynamo_backends")
    assert any(ep.name == "fxdit" and ep.value == "fxdit.backend:fxdit_backend" for ep in eps)
    assert "fxdit" in torch._dynamo.list_backends()


def test_import_has_no_side_effects():
    import subprocess
    import sys

    code = ("import sys, fxdit; mods = [m for m in sys.modules if m.startswith('fxdit.')]; "
            "print(','.join(sorted(mods)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "fxdit.errors"


@pytest.mark.parametrize("options, needle", [
    ({"atention": {}}, "did you mean 'attention'"),
    ({"bogus": 1}, "valid keys are: attention, cache, dump_dir, on_pass_error, inductor"),
    ({"attention": {"mode": "grat-z"}}, "attention.mode='grat-z'; expected one of"),
    ({"attention": {"group": (16,)}}, "attention.group=(16,); expected a tuple of 2 or 3 integers"),
    ({"attention": {"radius": -1}}, "attention.radius=-1; expected an integer >= 0"),
    ({"cache": {"schedule": {"period": 0}}}, "cache.schedule.period=0; expected an integer >= 1"),
    ({"cache": {"schedule": {"perod": 2}}}, "did you mean 'period'"),
    ({"cache": {"mode": "increment"}}, "cache.factors=None; expected a factor file"),
    ({"cache": {"roles": ["q", "gate"]}}, "cache.roles="),
    ({"on_pass_error": "ignore"}, "on_pass_error='ignore'; expected one of 'raise', 'fallback'"),
    ({"cache": {"schedule": {"full_steps": [1, 2]}}}, "contains step 0"),
    ("grat-b", "expected a mapping"),
])
def test_options_validation(options, needle):
    with pytest.raises(FxditError) as info:
        FxditConfig.from_options(options)
    assert needle in str(info.value)
    assert isinstance(info.value, ValueError)


def test_config_is_frozen_and_normalised():
    cfg = FxditConfig.from_options({"attention": {"mode": "grat-b", "group": [8, 8], "layers": [0, 2]}})
    assert cfg.attention.group == (8, 8) and cfg.attention.layers == (0, 2)
    with pytest.raises(Exception):
        cfg.attention.mode = "dense"  # type: ignore[misc]
    assert FxditConfig.from_options(None).lossless
    assert FxditConfig.from_options({"cache": {"schedule": "none"}}).cache.schedule.every_step_full


def test_dump_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FXDIT_DUMP_DIR", str(tmp_path))
    assert FxditConfig.from_options({}).dump_dir == str(tmp_path)


def test_identity_pipeline_matches_eager_and_reports():
    m = _Tiny().eval()
    x = torch.randn(2, 3, 10, 16)
    expected = m(x)
    fast = torch.compile(m, backend="fxdit", options={"on_pass_error": "raise"})
    torch.testing.assert_close(fast(x), expected)
    records = fxdit.reports(fast)
    assert len(records) == 1
    names = [r.name for r in records[0].reports]
    assert names[:2] == ["find_attention", "find_blocks"]
    assert fxdit.reports(m) == records


def test_make_backend_typed():
    cfg = FxditConfig.from_options({"on_pass_error": "raise"})
    m = _Tiny().eval()
    x = torch.randn(1, 2, 5, 16)
    fast = torch.compile(m, backend=fxdit.make_backend(cfg))
    torch.testing.assert_close(fast(x), m(x))


def test_fallback_keeps_graph_when_a_pass_fails(monkeypatch):
    from fxdit.passes._base import PassReport

    from fxdit import backend

    def broken_pass(gm, cfg):
        for n in list(gm.graph.nodes):
            if n.op == "call_function":
                gm.graph.erase_node  # touch the graph, then fail half-way
        raise KeyError("boom")

    broken_pass.__name__ = "broken_pass"

    def fine(gm, cfg):
        return PassReport("fine", matched=1)

    fine.__name__ = "fine"
    monkeypatch.setattr(backend, "PIPELINE", (fine, broken_pass))
    m = _Tiny().eval()
    x = torch.randn(1, 2, 5, 16)
    with pytest.warns(UserWarning, match="pass 'broken_pass' failed"):
        out = torch.compile(m, backend="fxdit", options={"on_pass_error": "fallback"})(x)
    torch.testing.assert_close(out, m(x))
    rep = fxdit.reports(m)[0].reports[1]
    assert rep.name == "broken_pass" and "pass failed: KeyError" in rep.skipped

    torch._dynamo.reset()
    with pytest.raises(Exception, match="error in pass 'broken_pass'"):
        torch.compile(m, backend="fxdit", options={"on_pass_error": "raise"})(x)
