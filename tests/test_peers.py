"""fxdit.apps.peers: peer caches measured side by side on a tiny random Flux model (fast: few steps, two samples).

diffusers' cache hooks are always installed and are tested for real; cache-dit and para-attn tests skip when the
optional package is missing (``pip install fxdit[peers]``)."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("diffusers")

from fxdit.apps import peers  # noqa: E402
from fxdit.apps.models import flux  # noqa: E402

STEPS = 6


@pytest.fixture(scope="module")
def tiny_demo():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    torch.manual_seed(0)
    cfg = dict(flux.transformer_config(), num_attention_heads=2, attention_head_dim=16, axes_dims_rope=(4, 6, 6),
               joint_attention_dim=16, pooled_projection_dim=8)
    model = FluxTransformer2DModel(**cfg).eval().requires_grad_(False)
    enc = flux.DigitTextEncoder(text_tokens=2, text_dim=16, pooled_dim=8).eval().requires_grad_(False)
    return flux.FluxDemo(model, enc, FlowMatchEulerDiscreteScheduler(**flux.scheduler_config()), image_size=(16, 16))


@pytest.fixture
def bench(tiny_demo):
    return peers.Bench(tiny_demo, peers.BenchSettings(steps=STEPS, classes=(1, 2), repeats=1,
                                                      compile_backend="eager"))


def test_specs_and_settings_reject_bad_values():
    with pytest.raises(ValueError, match="family"):
        peers.PeerSpec("x", "nope", "DBCache")
    with pytest.raises(ValueError, match="method"):
        peers.PeerSpec("x", "cache-dit", "FirstBlockCache")
    with pytest.raises(ValueError, match="settings"):
        peers.PeerSpec("x", "diffusers", "TaylorSeer", settings=[1])
    with pytest.raises(ValueError, match="repeats"):
        peers.BenchSettings(repeats=0)
    with pytest.raises(ValueError, match="classes"):
        peers.BenchSettings(classes=())
    for name, spec in peers.PEERS.items():
        assert spec.name == name and spec.family in peers.FAMILIES
    assert set(peers.MATCH_KNOBS) <= set(peers.PEERS)


def test_plain_row_is_the_reference(bench):
    row = bench.measure(peers.PeerSpec("plain", "fxdit", "plain"), compiled=False)
    assert row.error is None and math.isinf(row.psnr_db) and row.blocks_run == 1.0 and row.attention_run == 1.0
    assert len(row.times_s) == 1 and row.median_s > 0 and row.load is not None


@pytest.mark.parametrize("name, settings", [
    ("diffusers FirstBlockCache", {"threshold": 1e9}),  # every step after the first reuses the cached blocks
    ("diffusers TaylorSeer", {"cache_interval": 2, "disable_cache_before_step": 2}),
])
def test_diffusers_peer_really_skips(bench, name, settings):
    spec = peers.PEERS[name].with_settings(name, **settings)
    row = bench.measure(spec, compiled=False)
    assert row.error is None, row.error
    assert torch.isfinite(row.images).all() and row.images.shape == (2, 1, 16, 16)
    assert row.attention_run < 1.0
    assert math.isfinite(row.psnr_db)  # not the full computation
    again = bench.measure(spec, compiled=False, shares=False)  # each run starts from fresh cache state: same images
    torch.testing.assert_close(again.images, row.images, rtol=0, atol=0)


def test_magcache_calibrates_then_skips(bench):
    row = bench.measure(peers.PEERS["diffusers MagCache"].with_settings("mag", threshold=10.0), compiled=False)
    assert row.error is None, row.error
    assert row.notes == f"mag_ratios: {STEPS} calibrated" and row.blocks_run < 1.0


def test_compiled_peer_counts_dynamo_events(bench):
    spec = peers.PEERS["diffusers TaylorSeer"].with_settings("ts", cache_interval=2, disable_cache_before_step=2)
    row = bench.measure(spec, compiled=True)
    assert row.error is None, row.error
    assert row.compiled and row.graphs >= 1 and row.graph_breaks >= 0 and row.recompiles >= 0
    assert row.blocks_run is None  # shares are counted on eager rows only


def test_a_failing_peer_records_its_exception(bench, monkeypatch):
    def boom(*_a, **_k):
        raise KeyError("no such block")

    monkeypatch.setattr(peers.Bench, "build", boom)
    row = bench.measure(peers.PEERS["diffusers TaylorSeer"], compiled=False)
    assert row.error == "KeyError: 'no such block'" and row.median_s is None
    table = peers.format_markdown([row])
    assert "KeyError: 'no such block'" in table


def test_cache_dit_dbcache_skips_blocks(bench):
    pytest.importorskip("cache_dit")
    spec = peers.PEERS["cache-dit DBCache"].with_settings("db", residual_diff_threshold=1e9, max_warmup_steps=1)
    row = bench.measure(spec, compiled=False)
    assert row.error is None, row.error
    assert row.blocks_run < 1.0 and math.isfinite(row.psnr_db)
    again = bench.measure(spec, compiled=False, shares=False)  # refresh_context between runs: same images
    torch.testing.assert_close(again.images, row.images, rtol=0, atol=0)


def test_para_attn_first_block_cache_with_the_adapted_loop(bench):
    pytest.importorskip("para_attn")
    exact = bench.measure(peers.PEERS["para-attn FirstBlockCache"].with_settings("p0", residual_diff_threshold=0.0),
                          compiled=False)
    assert exact.error is None, exact.error
    assert math.isinf(exact.psnr_db) and exact.blocks_run == 1.0  # threshold 0: never reuses, same as the model
    skip = bench.measure(peers.PEERS["para-attn FirstBlockCache"].with_settings("p1", residual_diff_threshold=1e9),
                         compiled=False)
    assert skip.error is None and skip.blocks_run < 1.0
    compiled = bench.measure(peers.PEERS["para-attn FirstBlockCache"], compiled=True)
    assert compiled.error is None and compiled.graph_breaks >= 2  # its explicit graph breaks around the decision
