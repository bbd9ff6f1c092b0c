"""find_attention: sites, call forms, parameters and text/image spans, on the models and on hand-written graphs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _analysed import ALL_MODELS, analysed, needs, trace
from fxdit.passes._fx_utils import fresh_copy, fxdit_meta, nodes_by_name
from fxdit.passes.find_attention import find_attention
from hypothesis import given, settings
from hypothesis import strategies as st

from fxdit.analysis import analyze
from fxdit.apps.models.dit import DiT, DiTConfig
from fxdit.config import FxditConfig

CFG = FxditConfig()


def _run(fn, *args, **kwargs):
    gm, _ = trace(fn, *args, **kwargs)
    report = find_attention(gm, CFG)
    return gm, report, fxdit_meta(gm)["attention_sites"]


# ---------------------------------------------------------------------------------------------------------------
# Every named model
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_MODELS)
def test_sites_match_expected(name):
    spec, g = analysed(name)
    e = spec.expected
    sites = g.attention_sites
    assert len(sites) == e.attention_sites
    assert sum(not s.cross for s in sites) == e.self_attention_sites
    assert sum(s.cross for s in sites) == e.cross_attention_sites
    text_only = [s for s in sites if s.span_source == "text"]
    assert len(text_only) == getattr(e, "text_only_attention_sites", 0)
    assert not any(s.span_source == "unknown" for s in sites)
    report = g.reports[0]
    assert report.name == "find_attention" and report.matched == e.attention_sites and not report.skipped


@pytest.mark.parametrize("name", ALL_MODELS)
def test_spans_match_expected(name):
    spec, g = analysed(name)
    e = spec.expected
    for s in g.attention_sites:
        if s.span_source == "text":
            assert s.image_span is None and s.block is None
            continue
        assert s.block is not None
        if s.cross:
            assert s.span_source == "cross" and s.image_span == (0, s.q_len) and s.kv_len != s.q_len
            continue
        assert s.image_span == e.image_span
        assert s.text_span == e.text_span
        assert s.span_source == ("cat" if e.text_span is not None else "self")
        assert s.q_len == s.kv_len == e.image_span[1] - e.image_span[0] + (
            0 if e.text_span is None else e.text_span[1] - e.text_span[0])


@pytest.mark.parametrize("name", ALL_MODELS)
def test_site_records_point_at_graph_nodes(name):
    _, g = analysed(name)
    by_name = nodes_by_name(g.gm)
    for s in g.attention_sites:
        node = by_name[s.node]
        assert node.meta["fxdit"]["attention"] is s
        for ref in (s.q, s.k, s.v, *s.nodes):
            assert ref in by_name
        q = by_name[s.q].meta["example_value"]
        assert tuple(q.shape) == (s.batch, s.heads, s.q_len, s.head_dim)
        assert s.dtype == "float32"


# ---------------------------------------------------------------------------------------------------------------
# SDPA call forms
# ---------------------------------------------------------------------------------------------------------------


def test_sdpa_positional_arguments():
    q = torch.randn(2, 3, 10, 8)
    k = torch.randn(2, 3, 12, 8)
    mask = torch.zeros(10, 12)

    def f(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, mask, 0.0, False, scale=0.25)

    _, report, sites = _run(f, q, k, k, mask)
    assert report.matched == 1
    (s,) = sites
    assert s.form == "sdpa_positional"
    assert (s.batch, s.heads, s.kv_heads, s.q_len, s.kv_len, s.head_dim) == (2, 3, 3, 10, 12, 8)
    assert s.scale == 0.25 and s.mask_kind == "float" and s.mask is not None and not s.causal
    assert s.span_source == "unknown"  # no patch embedding, no token stream: the rewriters leave it dense


def test_sdpa_keyword_arguments_and_gqa():
    q = torch.randn(1, 4, 6, 8)
    kv = torch.randn(1, 2, 6, 8)

    def f(q, kv):
        mask = torch.ones(6, 6, dtype=torch.bool).tril()
        a = F.scaled_dot_product_attention(query=q, key=kv, value=kv, attn_mask=mask, dropout_p=0.0,
                                           enable_gqa=True)
        b = F.scaled_dot_product_attention(query=q, key=q, value=q, is_causal=True, scale=0.5)
        return a + b

    _, report, sites = _run(f, q, kv)
    assert report.matched == 2
    a, b = sites
    assert a.form == b.form == "sdpa_keyword"
    assert a.heads == 4 and a.kv_heads == 2 and a.enable_gqa and a.mask_kind == "bool" and a.scale is None
    assert b.causal and b.scale == 0.5 and b.mask_kind == "none" and b.mask is None


def test_both_forms_on_one_graph_keep_graph_order():
    x = torch.randn(1, 2, 5, 4)

    def f(x):
        a = F.scaled_dot_product_attention(x, x, x)
        return F.scaled_dot_product_attention(query=a, key=x, value=x)

    gm, _, sites = _run(f, x)
    assert [s.form for s in sites] == ["sdpa_positional", "sdpa_keyword"]
    order = [n.name for n in gm.graph.nodes]
    assert order.index(sites[0].node) < order.index(sites[1].node)


# ---------------------------------------------------------------------------------------------------------------
# Unfused forms
# ---------------------------------------------------------------------------------------------------------------


def _u_mul(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1) * 0.125, dim=-1) @ v


def _u_div_mT(q, k, v):
    return F.softmax((q @ k.mT) / 4.0, dim=-1) @ v


def _u_prescaled(q, k, v):
    return torch.softmax((q * 0.5) @ k.transpose(-1, -2), dim=-1) @ v


def _u_bmm_permute(q, k, v):
    qf, kf, vf = q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)
    return torch.bmm((torch.bmm(qf, kf.permute(0, 2, 1)) * 0.25).softmax(-1), vf)


def _u_methods(q, k, v):
    return torch.matmul(q, k.transpose(3, 2)).div(8.0).softmax(dim=3).matmul(v)


def _u_masked(q, k, v):
    mask = torch.zeros(q.shape[-2], k.shape[-2])
    return torch.softmax(q @ k.transpose(-2, -1) * 0.5 + mask, dim=-1) @ v


@pytest.mark.parametrize("fn, form, scale, layout, mask", [
    (_u_mul, "unfused", 0.125, "BHSD", "none"),
    (_u_div_mT, "unfused", 0.25, "BHSD", "none"),
    (_u_prescaled, "unfused_prescaled", 0.5, "BHSD", "none"),
    (_u_bmm_permute, "unfused", 0.25, "(BH)SD", "none"),
    (_u_methods, "unfused", 0.125, "BHSD", "none"),
    (_u_masked, "unfused", 0.5, "BHSD", "float"),
])
def test_unfused_forms(fn, form, scale, layout, mask):
    q = torch.randn(2, 3, 7, 8)
    _, report, sites = _run(fn, q, q + 1, q - 1)
    assert report.matched == 1 and not report.skipped
    (s,) = sites
    assert s.form == form and s.layout == layout and s.mask_kind == mask
    assert math.isclose(s.scale, scale)
    assert s.q_len == s.kv_len == 7 and s.head_dim == 8
    assert len(s.nodes) >= 3


def test_softmax_on_other_dim_is_a_near_miss():
    def f(q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1), dim=-2) @ v

    q = torch.randn(1, 2, 5, 4)
    _, report, sites = _run(f, q, q, q)
    assert sites == [] and report.matched == 0
    assert report.skipped == {"softmax not on the last dim": 1}


def test_plain_matmuls_are_not_attention():
    def f(a, b):
        return torch.relu(a @ b) @ b

    a = torch.randn(4, 4)
    _, report, sites = _run(f, a, a)
    assert sites == [] and report.matched == 0 and not report.skipped


# ---------------------------------------------------------------------------------------------------------------
# Spans on small hand-written models
# ---------------------------------------------------------------------------------------------------------------


class _CrossBlock(torch.nn.Module):
    """Self-attention over the image tokens (k/v from one fused projection), then cross-attention to text."""

    def __init__(self, c: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.kv, self.o = torch.nn.Linear(c, c), torch.nn.Linear(c, 2 * c), torch.nn.Linear(c, c)
        self.tq, self.tk, self.tv = torch.nn.Linear(c, c), torch.nn.Linear(c, c), torch.nn.Linear(c, c)

    def _h(self, x):
        b, n, c = x.shape
        return x.view(b, n, self.heads, c // self.heads).transpose(1, 2)

    def forward(self, h, text):
        k, v = self.kv(h).chunk(2, dim=-1)
        a = F.scaled_dot_product_attention(self._h(self.q(h)), self._h(k), self._h(v))
        h = h + self.o(a.transpose(1, 2).flatten(2))
        c = F.scaled_dot_product_attention(query=self._h(self.tq(h)), key=self._h(self.tk(text)),
                                           value=self._h(self.tv(text)))
        return h + c.transpose(1, 2).flatten(2)


class _CrossAttn(torch.nn.Module):
    """Patch-embed conv, then two PixArt-like blocks."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.embed = torch.nn.Conv2d(4, c, 2, 2)
        self.blocks = torch.nn.ModuleList([_CrossBlock(c) for _ in range(2)])

    def forward(self, x, text):
        h = self.embed(x).flatten(2).transpose(1, 2)
        for blk in self.blocks:
            h = blk(h, text)
        return h


def test_self_and_cross_attention_spans():
    m = _CrossAttn().eval()
    (g,) = analyze(m, torch.randn(1, 4, 8, 6), torch.randn(1, 5, 16))
    sites = g.attention_sites
    assert [s.cross for s in sites] == [False, True, False, True]
    assert [s.block for s in sites] == [0, 0, 1, 1]
    for s in sites:
        assert s.image_span == (0, 12) and s.text_span is None
    assert [s.span_source for s in sites] == ["self", "cross", "self", "cross"]
    assert g.token_grid.shape == (1, 4, 3)


# ---------------------------------------------------------------------------------------------------------------
# Analysis only, idempotent
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dit-tiny-unfused", pytest.param("flux", marks=needs("flux"))])
def test_idempotent_and_graph_unchanged(name):
    _, g = analysed(name)
    gm = fresh_copy(g.gm)
    code = gm.code
    first = [vars(s).copy() for s in fxdit_meta(gm)["attention_sites"]]
    report = find_attention(gm, CFG)
    again = [vars(s).copy() for s in fxdit_meta(gm)["attention_sites"]]
    assert again == first
    assert gm.code == code
    assert report.created == report.erased == report.rewritten == 0


# ---------------------------------------------------------------------------------------------------------------
# Property: random reference-DiT configurations
# ---------------------------------------------------------------------------------------------------------------


@st.composite
def dit_configs(draw):
    heads = draw(st.integers(1, 4))
    head_dim = draw(st.sampled_from([4, 8]))
    patch = draw(st.integers(1, 2))
    video = draw(st.booleans())
    if video:
        size = (draw(st.integers(1, 3)), 2 * draw(st.integers(1, 2)), 2 * draw(st.integers(1, 3)))
        patch_size = (1, patch, patch)
    else:
        size = (2 * draw(st.integers(1, 3)), 2 * draw(st.integers(1, 3)))
        patch_size = (patch, patch)
    text = draw(st.sampled_from([0, 3]))
    return DiTConfig(depth=draw(st.integers(1, 3)), hidden=heads * head_dim * 2, heads=heads, patch=patch_size,
                     input_size=size, in_channels=2, num_classes=3,
                     attention=draw(st.sampled_from(["sdpa", "unfused", "unfused_prescaled"])),
                     text_tokens=text, text_position=draw(st.sampled_from(["before", "after"])))


@settings(max_examples=10)
@given(cfg=dit_configs())
def test_reference_dit_property(cfg):
    torch.manual_seed(0)
    m = DiT(cfg).eval()
    args = [torch.randn(1, cfg.in_channels, *cfg.input_size), torch.tensor([5.0]), torch.tensor([1])]
    kwargs = {"text": torch.randn(1, cfg.text_tokens, cfg.hidden)} if cfg.text_tokens else {}
    (g,) = analyze(m, *args, **kwargs)
    n = cfg.tokens
    assert len(g.attention_sites) == cfg.depth
    assert [s.block for s in g.attention_sites] == list(range(cfg.depth))
    expect_form = {"sdpa": "sdpa_positional"}.get(cfg.attention, cfg.attention)
    for s in g.attention_sites:
        assert s.form == expect_form and s.heads == cfg.heads and s.head_dim == cfg.head_dim
        assert s.q_len == n + cfg.text_tokens
        if cfg.text_tokens == 0:
            assert (s.span_source, s.image_span, s.text_span) == ("self", (0, n), None)
        elif cfg.text_position == "before":
            assert (s.span_source, s.image_span, s.text_span) == ("cat", (cfg.text_tokens, n + cfg.text_tokens),
                                                                  (0, cfg.text_tokens))
        else:
            assert (s.span_source, s.image_span, s.text_span) == ("cat", (0, n), (n, n + cfg.text_tokens))
        if cfg.attention != "sdpa":
            assert math.isclose(s.scale, cfg.head_dim ** -0.5, rel_tol=1e-6)
    assert len(g.blocks) == cfg.depth
    assert g.token_grid.shape == cfg.grid


class _JointBlock(torch.nn.Module):
    """Dual-stream joint attention: per-stream q/k/v projections, cat along the sequence, split back."""

    def __init__(self, c: int = 16, heads: int = 2, text_first: bool = True) -> None:
        super().__init__()
        self.heads, self.text_first = heads, text_first
        self.img = torch.nn.ModuleList([torch.nn.Linear(c, c) for _ in range(4)])
        self.txt = torch.nn.ModuleList([torch.nn.Linear(c, c) for _ in range(4)])

    def _h(self, x):
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(self, h, ctx):
        n_txt = ctx.shape[1]
        qkv = []
        for i in range(3):
            a, b = self._h(self.txt[i](ctx)), self._h(self.img[i](h))
            qkv.append(torch.cat([a, b] if self.text_first else [b, a], dim=2))
        out = F.scaled_dot_product_attention(query=qkv[0], key=qkv[1], value=qkv[2]).transpose(1, 2).flatten(2)
        if self.text_first:
            t, i = out[:, :n_txt], out[:, n_txt:]
        else:
            i, t = out.split([h.shape[1], n_txt], dim=1)
        return h + self.img[3](i), ctx + self.txt[3](t)


class _JointModel(torch.nn.Module):
    """Packed latent tokens (Flux-like) and text tokens of the SAME count and width: only names tell them apart."""

    def __init__(self, text_first: bool) -> None:
        super().__init__()
        self.x_embedder = torch.nn.Linear(16, 16)
        self.context_embedder = torch.nn.Linear(16, 16)
        self.blocks = torch.nn.ModuleList([_JointBlock(text_first=text_first) for _ in range(2)])
        self.proj_out = torch.nn.Linear(16, 16)

    def forward(self, hidden_states, encoder_hidden_states):
        h, c = self.x_embedder(hidden_states), self.context_embedder(encoder_hidden_states)
        for blk in self.blocks:
            h, c = blk(h, c)
        return self.proj_out(h)


@pytest.mark.parametrize("text_first", [True, False])
def test_joint_attention_spans_with_equal_stream_lengths(text_first):
    m = _JointModel(text_first).eval()
    (g,) = analyze(m, torch.randn(1, 6, 16), torch.randn(1, 6, 16))
    assert len(g.attention_sites) == 2
    for s in g.attention_sites:
        assert s.form == "sdpa_keyword" and s.span_source == "cat" and not s.cross
        assert (s.text_span, s.image_span) == (((0, 6), (6, 12)) if text_first else ((6, 12), (0, 6)))
        assert s.text_first is text_first
    streams = [{lin.module.split(".")[2]: lin.stream for lin in b.linears} for b in g.blocks]
    assert streams == [{"img": "image", "txt": "text"}] * 2


@pytest.mark.skipif(needs("pixart-alpha") != [], reason="diffusers is not installed")
def test_diffusers_classic_processor_baddbmm_form():
    """diffusers' AttnProcessor: heads folded into the batch, baddbmm(empty|mask, q, kᵀ, alpha=scale), bmm."""
    from diffusers.models.attention_processor import AttnProcessor

    import fxdit.apps.models as models

    spec = models.build("pixart-alpha")
    for m in spec.model.modules():
        if hasattr(m, "set_processor"):
            m.set_processor(AttnProcessor())
    (g,) = analyze(spec.model, *spec.args, **spec.kwargs)
    e = spec.expected
    sites = g.attention_sites
    assert len(sites) == e.attention_sites and sum(s.cross for s in sites) == e.cross_attention_sites
    heads = spec.model.config.num_attention_heads
    for s in sites:
        assert s.form == "unfused" and s.layout == "(BH)SD" and s.heads == heads and s.batch == 1
        assert math.isclose(s.scale, s.head_dim ** -0.5, rel_tol=1e-6)
        assert s.image_span == e.image_span
        assert s.mask_kind == ("float" if s.cross else "none")
    assert [b.index for b in g.blocks] == list(range(e.blocks))


def test_aten_sdpa_on_a_graph_with_val_meta():
    """The aten overload is in the table too; post-grad style graphs carry ``meta["val"]``."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    def f(q, k, v):
        return torch.ops.aten.scaled_dot_product_attention.default(q, k, v, None, 0.0, True, scale=0.3)

    gm = torch.fx.symbolic_trace(f)
    q = torch.randn(1, 2, 6, 4)
    FakeTensorProp(gm, FakeTensorMode()).propagate(q, q, q)
    report = find_attention(gm, CFG)
    (s,) = fxdit_meta(gm)["attention_sites"]
    assert report.matched == 1 and s.form == "sdpa_positional" and s.causal and s.scale == 0.3
    assert (s.heads, s.q_len, s.head_dim) == (2, 6, 4)


def test_flex_attention_call_is_a_site_left_to_its_own_block_mask():
    from fxdit.passes.find_blocks import find_blocks
    from fxdit.passes.rewrite_grouped_attention import R_FLEX, rewrite_grouped_attention
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from fxdit.config import FxditConfig

    mask = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, 128, 128, device="cpu")

    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.out = torch.nn.Linear(32, 96), torch.nn.Linear(32, 32)

        def forward(self, h):
            q, k, v = (t.unflatten(-1, (2, 16)).transpose(1, 2) for t in self.qkv(h).chunk(3, -1))
            return h + self.out(flex_attention(q, k, v, block_mask=mask).transpose(1, 2).flatten(2))

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.patch = torch.nn.Conv2d(4, 32, 1)
            self.blocks = torch.nn.ModuleList([Attn()])

        def forward(self, x):
            h = self.patch(x).flatten(2).transpose(1, 2)
            for blk in self.blocks:
                h = blk(h)
            return h

    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(Block().eval(), backend=record)(torch.randn(1, 4, 8, 16))
    torch._dynamo.reset()
    (gm,) = graphs
    cfg = FxditConfig.from_options({"attention": {"mode": "grat-b", "group": (2, 2), "min_tokens": 0}})
    find_attention(gm, cfg)
    find_blocks(gm, cfg)
    (site,) = fxdit_meta(gm)["attention_sites"]
    assert (site.form, site.mask_kind, site.span_source, site.image_span) == ("flex_attention", "flex", "self",
                                                                             (0, 128))
    roles = sorted(lin.role for b in fxdit_meta(gm)["blocks"] for lin in b.linears)
    assert roles == ["attn_out", "qkv"]
    assert rewrite_grouped_attention(gm, cfg).skipped == {R_FLEX: 1}
