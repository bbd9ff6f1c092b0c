"""The symbolic cost model: exact MAC formulas, provenance of symbols, totals, and numbers vs expressions."""

import pytest
import sympy
import torch
import torch.nn.functional as F
from fxdit.passes._fx_utils import fxdit_meta, node_meta
from fxdit.passes._records import AttentionSite, TokenGrid

from fxdit.cost import B, L, N, graph_cost, macs


def _capture(fn, *args):
    """The Dynamo graph of ``fn(*args)`` via a recording backend (no inductor)."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(fn, backend=record, fullgraph=True)(*args)
    assert len(graphs) == 1
    return graphs[0]


def _check_consistent(table):
    """Every expression evaluated at the traced shapes equals its number; rows sum to the total."""
    subs = table.dims.subs()
    for item in (*table.nodes, *table.rows, table.total):
        assert int(item.macs_expr.subs(subs)) == item.macs, item
        assert int(item.bytes_expr.subs(subs)) == item.bytes, item
    assert sum(r.macs for r in table.rows) == table.total.macs
    assert sum(r.bytes for r in table.rows) == table.total.bytes
    assert sum(r.count for r in table.rows) == table.total.count == len(table.nodes)
    assert sympy.expand(sum(r.macs_expr for r in table.rows) - table.total.macs_expr) == 0
    assert sympy.expand(sum(r.bytes_expr for r in table.rows) - table.total.bytes_expr) == 0


@pytest.mark.parametrize("b0, n0, fin, fout", [(2, 10, 12, 20), (3, 7, 5, 9), (2, 16, 16, 16)])
def test_linear_macs_are_b_n_in_out(b0, n0, fin, fout):
    lin = torch.nn.Linear(fin, fout).eval()
    gm = _capture(lin, torch.randn(b0, n0, fin))
    table = graph_cost(gm, tokens=n0)
    row = table.row("linear")
    assert row is not None and row.count == 1
    assert sympy.expand(row.macs_expr - B * N * fin * fout) == 0
    assert row.macs == b0 * n0 * fin * fout
    # bytes: x read, weight and bias read, y written, fp32
    assert sympy.expand(row.bytes_expr - 4 * (B * N * fin + fin * fout + fout + B * N * fout)) == 0
    assert row.bytes == 4 * (b0 * n0 * fin + fin * fout + fout + b0 * n0 * fout)
    _check_consistent(table)
    assert macs(gm) == table.total.macs


@pytest.mark.parametrize("b0, h, n0, d", [(2, 3, 10, 8), (2, 2, 16, 16), (3, 4, 12, 12)])
def test_sdpa_macs_are_quadratic_in_n(b0, h, n0, d):
    """2·B·H·N²·D; a head dim equal to the token count stays a number (no N³)."""
    q, k, v = (torch.randn(b0, h, n0, d) for _ in range(3))
    gm = _capture(F.scaled_dot_product_attention, q, k, v)
    table = graph_cost(gm, tokens=n0)
    row = table.row("attention")
    assert sympy.expand(row.macs_expr - 2 * B * h * N**2 * d) == 0
    assert row.macs == 2 * b0 * h * n0 * n0 * d
    assert sympy.expand(row.bytes_expr - 4 * 4 * B * h * N * d) == 0  # q, k, v read, out written
    _check_consistent(table)


class _Block(torch.nn.Module):
    """Patch embed + attention + MLP, with hidden == tokens to trip a value-only heuristic."""

    def __init__(self, c=16, heads=2, patch=2):
        super().__init__()
        self.heads = heads
        self.embed = torch.nn.Conv2d(3, c, patch, patch)
        self.qkv = torch.nn.Linear(c, 3 * c)
        self.proj = torch.nn.Linear(c, c)
        self.fc1 = torch.nn.Linear(c, 4 * c)
        self.fc2 = torch.nn.Linear(4 * c, c)

    def forward(self, img):
        x = self.embed(img).flatten(2).transpose(1, 2)  # (B, N, C)
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        x = x + self.proj(a)
        return x + self.fc2(F.gelu(self.fc1(x)))


def _block_graph(b0=2, side=8, c=16, heads=2, patch=2):
    m = _Block(c, heads, patch).eval()
    gm = _capture(m, torch.randn(b0, 3, side, side))
    g = side // patch
    fxdit_meta(gm)["token_grid"] = TokenGrid((1, g, g), "conv2d", patch=(patch, patch))
    return gm, m


def test_block_costs_follow_token_provenance():
    """hidden (16) == N (16): linear MACs stay linear in N, attention quadratic, conv patch embed B·N·C·3·p²."""
    c, heads, patch, b0 = 16, 2, 2, 2
    gm, _ = _block_graph(b0=b0, side=8, c=c, heads=heads, patch=patch)
    table = graph_cost(gm)
    assert table.dims.batch == b0 and table.dims.tokens == 16
    lin = c * 3 * c + c * c + c * 4 * c + 4 * c * c
    assert sympy.expand(table.row("linear").macs_expr - B * N * lin) == 0
    assert sympy.expand(table.row("attention").macs_expr - 2 * B * heads * N**2 * (c // heads)) == 0
    assert sympy.expand(table.row("conv").macs_expr - B * N * c * 3 * patch * patch) == 0
    assert table.total.macs_expr.free_symbols == {B, N}
    _check_consistent(table)


def test_unfused_attention_site_nodes_count_as_attention():
    def attn(q, k, v):
        s = (q @ k.transpose(-2, -1)) * 0.25
        return s.softmax(-1) @ v

    b0, h, n0, d = 2, 2, 12, 6
    q, k, v = (torch.randn(b0, h, n0, d) for _ in range(3))
    gm = _capture(attn, q, k, v)
    calls = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    out = calls[-1]
    site = AttentionSite(node=out.name, form="unfused", nodes=tuple(n.name for n in calls), q="q", k="k", v="v",
                         batch=b0, heads=h, kv_heads=h, q_len=n0, kv_len=n0, head_dim=d)
    fxdit_meta(gm)["attention_sites"] = [site]
    table = graph_cost(gm)
    assert table.dims.tokens == n0 and table.dims.batch == b0
    assert [r.op_class for r in table.rows] == ["attention"]
    # two matmuls (2·B·H·N²·D) plus the scale multiply and the softmax (B·H·N² each)
    assert sympy.expand(table.total.macs_expr - (2 * B * h * N**2 * d + 2 * B * h * N**2)) == 0
    _check_consistent(table)


def test_grouped_attention_uses_recorded_density():
    import fxdit.kernels.ops  # noqa: F401 - registers fxdit::grouped_attention

    b0, h, n0, d = 2, 2, 16, 8
    q, k, v = (torch.randn(b0, h, n0, d) for _ in range(3))
    gm = _capture(F.scaled_dot_product_attention, q, k, v)
    dense = graph_cost(gm, tokens=n0).row("attention")
    node = next(n for n in gm.graph.nodes if n.op == "call_function")
    node.target = torch.ops.fxdit.grouped_attention.default  # cost reads only shapes and meta
    node_meta(node)["grat"] = {"density": 0.25, "mode": "grat-b"}
    table = graph_cost(gm, tokens=n0)
    row = table.row("attention")
    assert table.nodes[0].op == "fxdit::grouped_attention"
    assert sympy.expand(row.macs_expr - dense.macs_expr / 4) == 0
    assert row.macs * 4 == dense.macs
    _check_consistent(table)


def test_lowrank_increment_macs():
    import fxdit.kernels.ops  # noqa: F401 - registers fxdit::lowrank_increment

    b0, n0, fin, fout, r = 2, 10, 12, 20, 3
    x, xc = torch.randn(b0, n0, fin), torch.randn(b0, n0, fin)
    yc = torch.randn(b0, n0, fout)
    fb, fa = torch.randn(r, fin), torch.randn(fout, r)
    gm = _capture(lambda *a: torch.ops.fxdit.lowrank_increment(*a), x, xc, yc, fb, fa)
    for n in gm.graph.nodes:  # the factors are lifted constants in fxdit's cached graphs
        if n.op == "placeholder" and tuple(n.meta["example_value"].shape) in ((r, fin), (fout, r)):
            node_meta(n)["constant"] = True
    table = graph_cost(gm, tokens=n0)
    row = table.row("linear")
    assert sympy.expand(row.macs_expr - B * N * (fin + fout) * r) == 0
    assert row.macs == b0 * n0 * (fin + fout) * r
    _check_consistent(table)


def test_joint_text_tokens_give_n_plus_l():
    b0, n0, l0, c = 2, 12, 5, 8

    def joint(img, txt, w):
        x = torch.cat([txt, img], dim=1)
        q = x.reshape(b0, n0 + l0, 2, c // 2).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, q, q).transpose(1, 2).reshape(b0, n0 + l0, c)
        return F.linear(o[:, l0:], w)

    gm = _capture(joint, torch.randn(b0, n0, c), torch.randn(b0, l0, c), torch.randn(c, c))
    sdpa = next(n for n in gm.graph.nodes if "scaled_dot_product" in str(n.target))
    site = AttentionSite(node=sdpa.name, form="sdpa_positional", nodes=(sdpa.name,), q="q", k="q", v="q", batch=b0,
                         heads=2, kv_heads=2, q_len=n0 + l0, kv_len=n0 + l0, head_dim=c // 2,
                         image_span=(l0, l0 + n0), text_span=(0, l0))
    fxdit_meta(gm)["attention_sites"] = [site]
    table = graph_cost(gm, tokens=n0)
    assert table.dims.text == l0
    att = table.row("attention").macs_expr
    assert sympy.expand(att - 2 * B * 2 * (N + L) ** 2 * (c // 2)) == 0
    _check_consistent(table)


def test_unknown_ops_are_listed_and_views_are_free():
    def f(x):
        y = x.view(-1).reshape(x.shape).permute(0, 2, 1)
        return torch.special.i0(y)

    gm = _capture(f, torch.randn(2, 3, 4))
    table = graph_cost(gm)
    assert [n.op_class for n in table.nodes] == ["other"]
    assert table.unknown == {"special_i0": 1}
    _check_consistent(table)


def test_markdown_lists_every_row_and_the_symbols():
    gm, _ = _block_graph()
    table = graph_cost(gm)
    md = table.to_markdown()
    for r in table.rows:
        assert f"| {r.op_class} | {r.count} |" in md
        assert f"{r.macs:,}" in md
    assert "**total**" in md and "`N` = 16" in md


def test_dit_tiny_cost(dit_tiny_graph):
    """Reference DiT: linear MACs are B·N·Σ(in·out) over token linears + B·Σ over vector linears."""
    from fxdit.passes.pipeline import find_attention

    gm, spec = dit_tiny_graph
    find_attention(gm, None)
    table = graph_cost(gm)
    assert table.dims.tokens == spec.expected.tokens
    m = spec.model
    per_token = sum(mod.in_features * mod.out_features for name, mod in m.named_modules()
                    if isinstance(mod, torch.nn.Linear) and "adaLN" not in name and "t_embedder" not in name)
    per_sample = sum(mod.in_features * mod.out_features for name, mod in m.named_modules()
                     if isinstance(mod, torch.nn.Linear) and ("adaLN" in name or "t_embedder" in name))
    assert sympy.expand(table.row("linear").macs_expr - (B * N * per_token + B * per_sample)) == 0
    cfg = m.cfg if hasattr(m, "cfg") else None
    heads = cfg.heads if cfg is not None else 4
    hidden = cfg.hidden if cfg is not None else 64
    depth = cfg.depth if cfg is not None else 2
    assert sympy.expand(table.row("attention").macs_expr - depth * 2 * B * heads * N**2 * (hidden // heads)) == 0
    _check_consistent(table)


@pytest.fixture
def dit_tiny_graph():
    from fxdit.passes._fx_utils import fresh_copy

    from fxdit.apps.models import build

    spec = build("dit-tiny", batch=2)
    gm = _capture(lambda *a: spec.model(*a, **spec.kwargs), *spec.args)
    return fresh_copy(gm), spec


def test_nodes_without_shape_metadata_are_filled_by_fake_propagation():
    """A pass that builds nodes without meta["val"] still gets them counted (the graph's meta is left alone)."""
    b0, n0, fin, fout = 2, 10, 12, 20
    gm = _capture(torch.nn.Linear(fin, fout).eval(), torch.randn(b0, n0, fin))
    lin = next(n for n in gm.graph.nodes if n.op == "call_function")
    w = lin.args[1]
    with gm.graph.inserting_after(lin):
        # (B, N, fout) @ W[fout, fin]ᵀ needs fout == fin: a node whose shapes do not chain
        extra = gm.graph.call_function(torch._C._nn.linear, (lin, w))
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out.args = ((extra,),)
    gm.recompile()
    with pytest.raises(Exception):
        gm(torch.randn(b0, n0, fin))  # fout != fin: shapes do not chain, fake propagation fails too
    table = graph_cost(gm, tokens=n0)
    assert table.unknown.get("<no shape metadata>") == 1


def test_missing_metadata_filled():
    b0, n0, c = 2, 10, 12
    gm = _capture(torch.nn.Linear(c, c).eval(), torch.randn(b0, n0, c))
    lin = next(n for n in gm.graph.nodes if n.op == "call_function")
    with gm.graph.inserting_after(lin):
        extra = gm.graph.call_function(torch._C._nn.linear, (lin, lin.args[1]))
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out.args = ((extra,),)
    gm.recompile()
    table = graph_cost(gm, tokens=n0)
    assert "val" not in extra.meta and "example_value" not in extra.meta
    assert table.row("linear").count == 2
    assert sympy.expand(table.row("linear").macs_expr - 2 * B * N * c * c) == 0
    assert not table.unknown
    _check_consistent(table)


def test_symbolic_trace_graph_with_call_modules():
    """A plain ``symbolic_trace`` graph (call_module nodes, no metadata) is costed from example inputs."""
    c, b0, n0 = 12, 2, 10
    m = torch.nn.Sequential(torch.nn.LayerNorm(c), torch.nn.Linear(c, 3 * c), torch.nn.GELU(),
                            torch.nn.Linear(3 * c, c)).eval()
    gm = torch.fx.symbolic_trace(m)
    table = graph_cost(gm, tokens=n0, example_inputs=[torch.randn(b0, n0, c)])
    assert sympy.expand(table.row("linear").macs_expr - 2 * B * N * 3 * c * c) == 0
    assert table.row("elementwise").count == 1 and table.row("other").count == 1
    assert table.row("linear").macs == 2 * b0 * n0 * 3 * c * c
    _check_consistent(table)
