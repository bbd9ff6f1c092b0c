"""Graph dumps: files per graph and per pass, report.md sections, env var, robustness."""

import glob
import os

import pytest
import torch
import torch.nn.functional as F
from fxdit.passes._base import PassReport
from fxdit.passes._fx_utils import finish, fxdit_meta, node_meta

import fxdit
from fxdit.config import FxditConfig
from fxdit.dump import GraphDump, render_report


class _Attn(torch.nn.Module):
    """One attention layer: qkv linear, SDPA, output projection."""

    def __init__(self, c=32, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(c, 3 * c)
        self.proj = torch.nn.Linear(c, c)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(b, n, c)).relu()


def _mark_grat(gm, cfg):
    """A stand-in rewriting pass: tags SDPA nodes as GRAT-rewritten and swaps relu for a neg-neg-relu chain."""
    rewritten = 0
    for n in list(gm.graph.nodes):
        if n.op == "call_function" and "scaled_dot_product" in str(n.target):
            node_meta(n)["grat"] = {"mode": "grat-b", "group": (2, 2), "density": 0.5, "ideal_speedup": 2.0}
            rewritten += 1
        if n.op == "call_method" and n.target == "relu" or getattr(n.target, "__name__", "") == "relu":
            with gm.graph.inserting_before(n):
                a = gm.graph.call_function(torch.neg, (n.args[0],))
                b = gm.graph.call_function(torch.neg, (a,))
            a.meta, b.meta = dict(n.args[0].meta), dict(n.args[0].meta)
            n.args = (b,)
    finish(gm, True)
    return PassReport("_mark_grat", matched=rewritten, rewritten=rewritten, details={"note": "test pass"})


_mark_grat.__name__ = "_mark_grat"


@pytest.fixture
def no_inductor_grat(no_inductor, monkeypatch):
    """``no_inductor`` with a pipeline whose last pass marks every attention site as grouped."""
    from fxdit.passes.pipeline import find_attention, find_blocks

    from fxdit import backend

    monkeypatch.setattr(backend, "PIPELINE", (find_attention, find_blocks, _mark_grat))


def _graph_dirs(root):
    return sorted(glob.glob(os.path.join(str(root), "graph_*")))


def test_dump_files_per_graph_and_pass(tmp_path, no_inductor_grat):
    m = _Attn().eval()
    x = torch.randn(2, 12, 32)
    with torch.no_grad():
        out = torch.compile(m, backend="fxdit", options={"dump_dir": str(tmp_path), "on_pass_error": "raise"})(x)
        torch.testing.assert_close(out, m(x))
    dirs = _graph_dirs(tmp_path)
    assert len(dirs) == 1
    d = dirs[0]
    assert os.path.isfile(os.path.join(d, "00_input.py"))
    for i, name in enumerate(("find_attention", "find_blocks", "_mark_grat"), start=1):
        for f in ("before.py", "after.py", "report.txt", "diff.txt"):
            assert os.path.isfile(os.path.join(d, f"{i:02d}_{name}", f)), (name, f)
    with open(os.path.join(d, "03__mark_grat", "diff.txt")) as f:
        created = [line for line in f if line.startswith("+ ")]
    assert len(created) == 2
    with open(os.path.join(d, "report.md")) as f:
        report = f.read()
    for name in ("find_attention", "find_blocks", "_mark_grat"):
        assert f"| {name} |" in report
    for section in ("## Pass reports", "## Attention sites", "## Blocks and linear layers", "## Token grid", "## Cost"):
        assert section in report
    # one attention-site row, with the GRAT columns filled from node.meta["fxdit"]["grat"]
    site_rows = [line for line in report.splitlines() if "sdpa" in line and line.startswith("| ")]
    assert len(site_rows) == 1 and "grat-b group (2, 2), density 0.5, ideal ×2" in site_rows[0]
    assert "| linear | 2 |" in report and "| attention | 1 |" in report
    import json

    with open(os.path.join(d, "cost.json")) as f:
        cost = json.load(f)["graph"]
    assert cost["dims"]["B"] == 2 and cost["dims"]["N"] == 12
    assert sum(r["macs"] for r in cost["rows"]) == cost["total"]["macs"] > 0
    rec = fxdit.reports(m)[0]
    assert rec.dump_dir == d


def test_dump_dir_from_environment(tmp_path, monkeypatch, no_inductor_grat):
    monkeypatch.setenv("FXDIT_DUMP_DIR", str(tmp_path / "env"))
    m = _Attn().eval()
    with torch.no_grad():
        torch.compile(m, backend="fxdit")(torch.randn(1, 6, 32))
    dirs = _graph_dirs(tmp_path / "env")
    assert len(dirs) == 1
    assert os.path.isfile(os.path.join(dirs[0], "report.md"))
    assert os.path.isfile(os.path.join(dirs[0], "00_input.py"))


def test_unwritable_dump_never_breaks_compilation(tmp_path, no_inductor_grat):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    m = _Attn().eval()
    x = torch.randn(1, 6, 32)
    with torch.no_grad():
        out = torch.compile(m, backend="fxdit", options={"dump_dir": str(blocker / "dump")})(x)
        torch.testing.assert_close(out, m(x))


def test_failing_report_never_breaks_compilation(tmp_path, no_inductor_grat, monkeypatch):
    from fxdit import dump

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(dump, "render_report", broken)
    m = _Attn().eval()
    x = torch.randn(1, 6, 32)
    with torch.no_grad():
        out = torch.compile(m, backend="fxdit", options={"dump_dir": str(tmp_path)})(x)
        torch.testing.assert_close(out, m(x))
    d = _graph_dirs(tmp_path)[0]
    assert os.path.isfile(os.path.join(d, "00_input.py")) and not os.path.exists(os.path.join(d, "report.md"))


def _graph_of(m, x):
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        torch.compile(m, backend=record)(x)
    from fxdit.passes._fx_utils import fresh_copy

    return fresh_copy(graphs[0])


def test_variants_and_cache_memory_sections(tmp_path):
    from fxdit.passes.pipeline import find_attention, find_blocks

    gm = _graph_of(_Attn().eval(), torch.randn(2, 12, 32))
    cfg = FxditConfig.from_options({"dump_dir": str(tmp_path)})
    dump = GraphDump(str(tmp_path), 7, cfg)
    dump.input(gm, [])
    reports = [find_attention(gm, cfg), find_blocks(gm, cfg)]
    full = _graph_of(torch.nn.Sequential(_Attn(), _Attn()).eval(), torch.randn(2, 12, 32))
    dump.variant("icc_full", full, PassReport("icc_full", matched=2))
    fxdit_meta(gm)["cache_bytes"] = {"inputs": 3072, "outputs": 6144}
    dump.finish(gm, reports, [])
    path = os.path.join(str(tmp_path), "graph_007")
    assert os.path.isfile(os.path.join(path, "01_icc_full", "after.py"))
    assert os.path.isfile(os.path.join(path, "01_icc_full", "cost.md"))
    with open(os.path.join(path, "report.md")) as f:
        report = f.read()
    assert "## Graph variants" in report and "| icc_full |" in report
    assert "| 2.000 |" in report  # two attention layers: twice the MACs of the main graph
    assert "## Cache memory" in report and "9,216" in report


def test_report_without_analysis_records():
    """A graph no analysis pass ran on still gets a report (empty tables, numbers-only costs)."""
    gm = _graph_of(_Attn().eval(), torch.randn(2, 12, 32))
    text = render_report(gm, [])
    assert "## Attention sites\n\nNone found." in text
    assert "## Cost" in text and "| **total** |" in text


def test_provisional_report_survives_a_failing_lowering(tmp_path, no_inductor_grat, monkeypatch):
    from fxdit import backend

    def failing_lower(gm, example_inputs, cfg):
        raise RuntimeError("inductor exploded")

    monkeypatch.setattr(backend, "lower", failing_lower)
    m = _Attn().eval()
    with torch.no_grad(), pytest.raises(Exception, match="inductor exploded"):
        torch.compile(m, backend="fxdit", options={"dump_dir": str(tmp_path)})(torch.randn(1, 6, 32))
    with open(os.path.join(_graph_dirs(tmp_path)[0], "report.md")) as f:
        report = f.read()
    assert "Provisional: written after pass '_mark_grat'" in report
    assert "| find_attention |" in report and "| _mark_grat |" in report


def test_grat_column_matches_a_replacement_node_by_qkv():
    """A rewrite that builds a new node (no site record carried) is still shown on its site's row."""
    import fxdit.kernels.ops  # noqa: F401 - registers fxdit::grouped_attention
    from fxdit.passes.pipeline import find_attention

    gm = _graph_of(_Attn().eval(), torch.randn(2, 12, 32))
    find_attention(gm, FxditConfig())
    sdpa = next(n for n in gm.graph.nodes if "scaled_dot_product" in str(n.target))
    site = fxdit_meta(gm)["attention_sites"][0]
    with gm.graph.inserting_after(sdpa):
        new = gm.graph.call_function(torch.ops.fxdit.grouped_attention.default, sdpa.args[:3])
    new.meta["val"] = sdpa.meta.get("example_value")
    new.meta["fxdit"] = {"grat": {"mode": "grat-x", "density": 0.25}}
    sdpa.replace_all_uses_with(new)
    gm.graph.erase_node(sdpa)
    gm.recompile()
    row = next(line for line in render_report(gm, []).splitlines() if line.startswith(f"| {site.node} |"))
    assert "grat-x, density 0.25, ideal ×4" in row
