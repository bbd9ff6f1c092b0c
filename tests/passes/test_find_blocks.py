"""find_blocks: blocks, linear roles by dataflow, streams, token grid; analysis only and idempotent."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _analysed import ALL_MODELS, analysed, needs, trace
from fxdit.passes._fx_utils import fresh_copy, fxdit_meta, nodes_by_name
from fxdit.passes._records import LINEAR_ROLES
from fxdit.passes.find_attention import find_attention
from fxdit.passes.find_blocks import find_blocks

from fxdit.analysis import analyze, analyze_graph
from fxdit.config import FxditConfig


def _role_counts(block) -> dict[str, int]:
    counts = {r: 0 for r in LINEAR_ROLES}
    for lin in block.linears:
        counts[lin.role] += 1
    return counts


@pytest.mark.parametrize("name", ALL_MODELS)
def test_blocks_and_roles_match_expected(name):
    spec, g = analysed(name)
    e = spec.expected
    assert len(g.blocks) == e.blocks
    assert [b.index for b in g.blocks] == list(range(e.blocks))
    for b in g.blocks:
        assert _role_counts(b) == e.roles(b.index), f"{name} block {b.index} ({b.path})"
        assert b.tokens == e.tokens
        assert b.hidden > 0
    sites_per_block = [sum(1 for s in g.attention_sites if s.block == b.index) for b in g.blocks]
    assert sites_per_block == [e.attention_per_block] * e.blocks


@pytest.mark.parametrize("name", ALL_MODELS)
def test_token_grid_matches_expected(name):
    spec, g = analysed(name)
    grid = g.token_grid
    assert grid is not None and grid.shape == spec.expected.token_grid
    assert grid.source in ("conv2d", "conv3d", "ids", "unfold", "unpatchify")
    by_name = nodes_by_name(g.gm)
    patch = by_name[grid.patch_node].meta["example_value"]
    batch = spec.args[0].shape[0]
    assert tuple(patch.shape[:2]) == (batch, spec.expected.tokens)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_linear_records(name):
    _, g = analysed(name)
    by_name = nodes_by_name(g.gm)
    for b in g.blocks:
        for lin in b.linears:
            node = by_name[lin.node]
            assert node.meta["fxdit"]["linear"] is lin
            w = by_name[lin.weight].meta["example_value"]
            assert tuple(w.shape) == (lin.out_features, lin.in_features)
            assert lin.block == b.index and lin.module.startswith(b.path + ".")
            assert lin.stream in ("image", "text", "joint")
            if lin.role == "modulation":
                assert lin.tokens == 1 and lin.out_features % b.hidden == 0
            if lin.role in ("q", "k", "v", "qkv", "attn_out", "mlp_in", "mlp_out"):
                assert lin.tokens > 1


@pytest.mark.parametrize("name, streams", [
    pytest.param("sd3", {"image": 6, "text": 6}, marks=needs("sd3")),
    pytest.param("flux", {"image": 6, "text": 6}, marks=needs("flux")),
    pytest.param("pixart-alpha", {"image": 8, "text": 2}, marks=needs("pixart-alpha")),
])
def test_dual_stream_labels(name, streams):
    """Dual-stream (and cross-attention) blocks label each token linear with the stream it reads."""
    _, g = analysed(name)
    b = g.blocks[0]
    got: dict[str, int] = {}
    for lin in b.linears:
        if lin.tokens > 1:
            got[lin.stream] = got.get(lin.stream, 0) + 1
    assert got == streams


def test_single_stream_blocks_are_joint():
    _, g = analysed("dit-tiny")
    assert {lin.stream for b in g.blocks for lin in b.linears} == {"joint"}


@pytest.mark.skipif(not needs("flux") == [], reason="diffusers is not installed")
def test_flux_grid_needs_position_ids_or_option():
    spec, g = analysed("flux")
    bare = fresh_copy(g.gm)
    state = fxdit_meta(bare)
    state.pop("position_ids", None)
    for key in ("attention_sites", "blocks", "token_grid"):
        state.pop(key, None)
    report = find_blocks(bare, FxditConfig())
    assert state["token_grid"] is None and "attention.grid" in report.details["grid_reason"]
    assert len(state["blocks"]) == spec.expected.blocks  # blocks and roles do not need the grid
    grid = spec.expected.token_grid[1:]
    find_blocks(bare, FxditConfig.from_options({"attention": {"grid": grid}}))
    assert state["token_grid"].shape == spec.expected.token_grid and state["token_grid"].source == "option"


def test_grid_option_overrides_inferred_grid():
    spec, g = analysed("dit-video-tiny")
    cfg = FxditConfig.from_options({"attention": {"grid": (2, 8, 4)}})
    again = analyze_graph(g.gm, g.example_inputs, cfg)
    assert again.token_grid.shape == (2, 8, 4) and again.token_grid.source == "option"
    assert again.token_grid.patch_node == g.token_grid.patch_node


@pytest.mark.parametrize("name", ["dit-tiny", pytest.param("hunyuan-video", marks=needs("hunyuan-video"))])
def test_idempotent_and_graph_unchanged(name):
    _, g = analysed(name)
    gm = fresh_copy(g.gm)
    code = gm.code
    snap = lambda: ([(b.path, b.tokens, b.hidden, [vars(lin).copy() for lin in b.linears])  # noqa: E731
                     for b in fxdit_meta(gm)["blocks"]], fxdit_meta(gm)["token_grid"],
                    [vars(s).copy() for s in fxdit_meta(gm)["attention_sites"]])
    first = snap()
    find_attention(gm, FxditConfig())
    report = find_blocks(gm, FxditConfig())
    assert snap() == first
    assert gm.code == code
    assert report.created == report.erased == report.rewritten == 0


def test_blocks_without_find_attention_first():
    gm, inputs = trace(torch.nn.Sequential(), torch.randn(2))  # no attention at all
    report = find_blocks(gm, FxditConfig())
    assert report.matched == 0 and fxdit_meta(gm)["blocks"] == [] and fxdit_meta(gm)["attention_sites"] == []


class _GegluBlock(torch.nn.Module):
    """Fused qkv split by chunk, GEGLU MLP, adaLN-style modulation, one extra token linear."""

    def __init__(self, c: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.out = torch.nn.Linear(c, 3 * c), torch.nn.Linear(c, c)
        self.ff_in, self.ff_out = torch.nn.Linear(c, 8 * c), torch.nn.Linear(4 * c, c)
        self.mod, self.extra = torch.nn.Linear(c, 2 * c), torch.nn.Linear(c, c)

    def forward(self, h, temb):
        b, n, _ = h.shape
        scale, shift = self.mod(F.silu(temb)).chunk(2, dim=-1)
        y = h * (1 + scale[:, None]) + shift[:, None]
        q, k, v = self.qkv(y).chunk(3, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
        h = h + self.out(a)
        g, u = self.ff_in(h).chunk(2, dim=-1)
        h = h + self.ff_out(F.gelu(g) * u)
        return h + self.extra(h)


class _GegluBlockModel(torch.nn.Module):
    """Packed tokens in, unpatchify out (the only place the grid shows), three blocks in a ModuleList."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.proj_in = torch.nn.Linear(8, c)
        self.layers = torch.nn.ModuleList([_GegluBlock(c) for _ in range(3)])
        self.proj_out = torch.nn.Linear(c, 8)

    def forward(self, x, temb):
        b = x.shape[0]
        h = self.proj_in(x)
        for blk in self.layers:
            h = blk(h, temb)
        out = self.proj_out(h)  # (B, N, 8) = 2x2 patches of 2 channels on a 3x4 grid
        return out.reshape(b, 3, 4, 2, 2, 2).permute(0, 5, 1, 3, 2, 4).reshape(b, 2, 6, 8)


def test_roles_by_dataflow_geglu_chunked_qkv_unpatchify_grid():
    m = _GegluBlockModel().eval()
    (g,) = analyze(m, torch.randn(1, 12, 8), torch.randn(1, 16))
    assert len(g.blocks) == 3
    for b in g.blocks:
        roles = {lin.module.rsplit(".", 1)[-1]: lin.role for lin in b.linears}
        assert roles == {"mod": "modulation", "qkv": "qkv", "out": "attn_out", "ff_in": "mlp_in",
                         "ff_out": "mlp_out", "extra": "other"}
        assert b.tokens == 12 and b.hidden == 16
    assert g.token_grid.shape == (1, 3, 4) and g.token_grid.source == "unpatchify"
    assert g.token_grid.unpatch_node is not None


class _PatchifyModel(torch.nn.Module):
    """Reshape/permute patchify of a 4-D or 5-D latent (no conv), then a linear patch embedding."""

    def __init__(self, channels: int = 2, patch: int = 2, c: int = 16) -> None:
        super().__init__()
        self.patch = patch
        self.embed = torch.nn.Linear(channels * patch * patch, c)
        self.layers = torch.nn.ModuleList([_GegluBlock(c) for _ in range(2)])

    def forward(self, x, temb):
        p = self.patch
        if x.dim() == 4:
            b, ch, hh, ww = x.shape
            t = x.reshape(b, ch, hh // p, p, ww // p, p).permute(0, 2, 4, 1, 3, 5)
        else:
            b, ch, tt, hh, ww = x.shape
            t = x.reshape(b, ch, tt, hh // p, p, ww // p, p).permute(0, 2, 3, 5, 1, 4, 6)
        h = self.embed(t.reshape(b, -1, ch * p * p))
        for blk in self.layers:
            h = blk(h, temb)
        return h


@pytest.mark.parametrize("shape, grid", [((1, 2, 8, 12), (1, 4, 6)), ((1, 2, 3, 4, 8), (3, 2, 4))])
def test_reshape_patchify_grid(shape, grid):
    (g,) = analyze(_PatchifyModel().eval(), torch.randn(*shape), torch.randn(1, 16))
    assert g.token_grid.shape == grid and g.token_grid.source == "unfold"
    assert len(g.blocks) == 2 and all(b.tokens == grid[0] * grid[1] * grid[2] for b in g.blocks)
    assert [s.image_span for s in g.attention_sites] == [(0, grid[0] * grid[1] * grid[2])] * 2


def test_dynamic_shapes_use_trace_time_sizes():
    """A graph Dynamo traced with symbolic sizes is analysed with their example values."""
    import fxdit.apps.models as models

    spec = models.build("dit-tiny", batch=2)
    graphs = []

    def backend(gm, example_inputs, **_):
        graphs.append(analyze_graph(gm, example_inputs))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(spec.model, backend=backend, dynamic=True)(*spec.args, **spec.kwargs)
    torch._dynamo.reset()
    (g,) = graphs
    e = spec.expected
    assert len(g.attention_sites) == e.attention_sites and len(g.blocks) == e.blocks
    assert g.token_grid.shape == e.token_grid
    assert all(s.image_span == e.image_span and s.batch == 2 for s in g.attention_sites)
    assert all(_role_counts(b) == e.roles(b.index) for b in g.blocks)


@pytest.mark.parametrize("name, overrides", [
    pytest.param("sd3", {"dual_attention_layers": (0,)}, marks=needs("sd3")),  # SD3.5: extra image-only attn2
    pytest.param("hunyuan-video", {"num_single_layers": 2, "num_refiner_layers": 2}, marks=needs("hunyuan-video")),
])
def test_model_variants(name, overrides):
    import fxdit.apps.models as models

    spec = models.build(name, **overrides)
    (g,) = analyze(spec.model, *spec.args, **spec.kwargs)
    e = spec.expected
    assert len(g.attention_sites) == e.attention_sites and len(g.blocks) == e.blocks
    assert sum(s.span_source == "text" for s in g.attention_sites) == getattr(e, "text_only_attention_sites", 0)
    assert all(_role_counts(b) == e.roles(b.index) for b in g.blocks)
    assert g.token_grid.shape == e.token_grid
    joint = [s for s in g.attention_sites if s.span_source == "cat"]
    assert joint and all((s.image_span, s.text_span) == (e.image_span, e.text_span) for s in joint)
    image_only = [s for s in g.attention_sites if s.span_source == "self"]
    assert all(s.image_span == e.image_span and s.text_span is None for s in image_only)
