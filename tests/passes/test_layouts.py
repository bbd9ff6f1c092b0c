"""Token layouts the analysis must understand without ``attention.grid``, checked against a dense-mask oracle.

Each model below is written by hand and knows where its tokens are: the test builds the grouped mask from the
model's own constants (grid, group, where the non-image tokens sit) with the few lines of :func:`grat_mask`, and
compares the rewritten graph with the eager model whose SDPA calls get that mask (no fxdit helper involved).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from fxdit.passes._fx_utils import fresh_copy, fxdit_meta, lifted_constants
from fxdit.passes.pipeline import find_attention, find_blocks
from fxdit.passes.rewrite_grouped_attention import R_RAGGED, rewrite_grouped_attention
from torch import nn

from fxdit.config import FxditConfig

OP = torch.ops.fxdit.grouped_attention.default


def grat_mask(grid: tuple[int, ...], group: tuple[int, ...], radius: int, seq: int, image_start: int) -> torch.Tensor:
    """bool ``[S, S]``: GRAT-B over raster image tokens at ``image_start``; every other token is global."""
    coords = torch.cartesian_prod(*(torch.arange(n) for n in grid)).reshape(-1, len(grid))
    ids = coords // torch.tensor(group)
    n = coords.shape[0]
    img = ((ids[:, None, :] - ids[None, :, :]).abs() <= radius).all(-1)
    mask = torch.ones(seq, seq, dtype=torch.bool)
    mask[image_start:image_start + n, image_start:image_start + n] = img
    return mask


class JointWithRegisters(nn.Module):
    """Joint attention over caption tokens, learned register tokens and patchified image tokens.

    ``order`` gives the sequence order of the three segments, e.g. ``("reg", "text", "image")`` (register tokens
    beside the caption, both before the image) or ``("text", "image", "reg")`` (non-image tokens on both sides).
    """

    def __init__(self, order: tuple[str, ...], hidden: int = 32, heads: int = 2, registers: int = 3) -> None:
        super().__init__()
        self.order, self.heads = order, heads
        self.patch = nn.Conv2d(4, hidden, 2, 2)
        self.registers = nn.Parameter(torch.randn(1, registers, hidden))
        self.text_proj = nn.Linear(16, hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.mask: torch.Tensor | None = None  # the oracle's mask, when set

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        img = self.patch(x).flatten(2).transpose(1, 2)
        parts = {"image": img, "text": self.text_proj(text), "reg": self.registers.expand(b, -1, -1)}
        seq = torch.cat([parts[p] for p in self.order], dim=1)
        q, k, v = self.qkv(seq).chunk(3, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)
        return self.out(o.transpose(1, 2).flatten(2))


@pytest.mark.parametrize("order, image_start, spans", [
    (("reg", "text", "image"), 8, ((0, 8),)),
    (("text", "image", "reg"), 5, ((0, 5), (69, 72))),
    (("image", "reg", "text"), 0, ((64, 72),)),
])
def test_register_tokens_beside_the_caption(order, image_start, spans):
    torch.manual_seed(0)
    model = JointWithRegisters(order).eval()
    x, text = torch.randn(2, 4, 16, 16), torch.randn(2, 5, 16)
    gm, inputs = _capture_kw(model, (x, text), {})
    (site,) = fxdit_meta(gm)["attention_sites"]
    assert site.span_source == "cat" and site.image_span == (image_start, image_start + 64)
    assert site.global_spans == spans
    assert fxdit_meta(gm)["token_grid"].shape == (1, 8, 8)

    cfg = FxditConfig.from_options({"attention": {"mode": "grat-b", "group": (2, 2), "radius": 1, "min_tokens": 0},
                                    "on_pass_error": "raise"})
    work = fresh_copy(gm)
    report = rewrite_grouped_attention(work, cfg)
    assert report.rewritten == 1 and sum(n.target is OP for n in work.graph.nodes) == 1
    with torch.no_grad():
        out = work(*inputs, *lifted_constants(work))
        out = out[0] if isinstance(out, (tuple, list)) else out
        dense = model(x, text)
        model.mask = grat_mask((8, 8), (2, 2), 1, 72, image_start)
        ref = model(x, text)
        model.mask = None
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    assert (out - dense).abs().max() > 1e-3  # the grouped mask drops attention here


@contextlib.contextmanager
def masked_sdpa(*masks: torch.Tensor):
    """Eager SDPA calls over ``S`` query and key tokens get the boolean ``[S, S]`` mask of that size (the oracle)."""
    orig = F.scaled_dot_product_attention
    by_len = {m.shape[0]: m for m in masks}

    def sdpa(q, k, v, attn_mask=None, *args, **kwargs):
        if q.shape[-2] == k.shape[-2] and q.shape[-2] in by_len:
            assert attn_mask is None
            attn_mask = by_len[q.shape[-2]]
        return orig(q, k, v, attn_mask, *args, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = orig


def _rewrite_and_compare(model, args, kwargs, grid, image_start, seq, group=(2, 2), radius=1):
    gm, inputs = _capture_kw(model, args, kwargs)
    cfg = FxditConfig.from_options({"attention": {"mode": "grat-b", "group": group, "radius": radius,
                                                  "min_tokens": 0}, "on_pass_error": "raise"})
    work = fresh_copy(gm)
    report = rewrite_grouped_attention(work, cfg)
    with torch.no_grad():
        out = work(*inputs, *lifted_constants(work))
        out = out[0] if isinstance(out, (tuple, list)) else out
        dense = _first(model(*args, **kwargs))
        with masked_sdpa(grat_mask(grid, group, radius, seq, image_start)):
            ref = _first(model(*args, **kwargs))
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    assert (out - dense).abs().max() > 1e-3
    return gm, report


def _first(out):
    while isinstance(out, (tuple, list)) or hasattr(out, "sample"):
        out = out[0] if isinstance(out, (tuple, list)) else out.sample
    return out


def _capture_kw(model, args, kwargs):
    graphs = []

    def record(gm, example_inputs):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=record, fullgraph=True)(*args, **kwargs)
    torch._dynamo.reset()
    assert len(graphs) == 1
    gm, inputs = graphs[0]
    find_attention(gm, FxditConfig())
    find_blocks(gm, FxditConfig())
    return gm, inputs


def test_continuous_latent_with_norm_before_a_pointwise_conv():
    """diffusers' continuous-input ``Transformer2DModel``: group norm, 1×1 conv, channels-last permute, reshape."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.Transformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=32, num_layers=1,
                                         norm_num_groups=8).eval()
    x = torch.randn(2, 32, 8, 8)
    gm, report = _rewrite_and_compare(model, (x,), {"return_dict": False}, (8, 8), 0, 64)
    assert fxdit_meta(gm)["token_grid"].shape == (1, 8, 8)
    assert report.rewritten == 1


class FramesInBatch(nn.Module):
    """Video tokens from a per-frame 2-D patch conv: frames folded into the batch, joined to the sequence later."""

    def __init__(self, hidden: int = 32, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.patch = nn.Conv2d(4, hidden, 2, 2)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, f, h, w = x.shape
        tok = self.patch(x.permute(0, 2, 1, 3, 4).flatten(0, 1)).flatten(2).transpose(1, 2)  # (B·F, N, C)
        seq = tok.unflatten(0, (b, f)).flatten(1, 2)  # (B, F·N, C)
        q, k, v = self.qkv(seq).chunk(3, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v)
        return self.out(o.transpose(1, 2).flatten(2))


def test_video_frames_folded_into_the_batch():
    torch.manual_seed(0)
    model = FramesInBatch().eval()
    x = torch.randn(2, 4, 3, 8, 12)
    gm, report = _rewrite_and_compare(model, (x,), {}, (3, 4, 6), 0, 72, group=(1, 2, 2), radius=0)
    grid = fxdit_meta(gm)["token_grid"]
    assert grid.shape == (3, 4, 6) and grid.frames_in_batch == 3
    assert report.rewritten == 1


class PackedWithPositionTable(nn.Module):
    """Packed ``(B, N, C)`` tokens (no patchify in the graph); the grid shows only in a rotary table built per axis
    and broadcast over ``(H, W)`` before being flattened to one row per token."""

    def __init__(self, grid: tuple[int, int], hidden: int = 32, heads: int = 2) -> None:
        super().__init__()
        self.grid, self.heads = grid, heads
        self.proj = nn.Linear(12, hidden)
        self.register_buffer("freqs", torch.randn(32, hidden // heads // 2))
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.grid
        d = self.freqs.shape[1]
        rows = self.freqs[:h].view(h, 1, d).expand(h, w, d)
        cols = self.freqs[h:h + w].view(1, w, d).expand(h, w, d)
        table = torch.cat([rows, cols], dim=-1).reshape(h * w, 2 * d)
        q, k, v = self.qkv(self.proj(x)).chunk(3, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        q, k = q * table.cos() + q.roll(1, -1) * table.sin(), k * table.cos() + k.roll(1, -1) * table.sin()
        o = F.scaled_dot_product_attention(q, k, v)
        return self.out(o.transpose(1, 2).flatten(2))


def test_packed_tokens_grid_from_a_position_table():
    torch.manual_seed(0)
    model = PackedWithPositionTable((4, 6)).eval()
    x = torch.randn(2, 24, 12)
    gm, report = _rewrite_and_compare(model, (x,), {}, (4, 6), 0, 24, group=(2, 2), radius=0)
    grid = fxdit_meta(gm)["token_grid"]
    assert grid.shape == (1, 4, 6) and grid.source == "position table"
    assert report.rewritten == 1


class DisagreeingUnpatchify(PackedWithPositionTable):
    """The position table says 4×6; the output reshape says 6×4: two sources, two grids."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.grid
        return super().forward(x).reshape(x.shape[0], w, h, 3, 2, 2)  # unpack 2×2 patches


def test_grid_sources_that_disagree_leave_the_site_dense_with_the_reason():
    torch.manual_seed(0)
    model = DisagreeingUnpatchify((4, 6)).eval()
    gm, _ = _capture_kw(model, (torch.randn(2, 24, 12),), {})
    assert fxdit_meta(gm).get("token_grid") is None
    cfg = FxditConfig.from_options({"attention": {"mode": "grat-b", "group": (2, 2), "min_tokens": 0},
                                    "on_pass_error": "raise"})
    work = fresh_copy(gm)
    report = rewrite_grouped_attention(work, cfg)
    assert report.rewritten == 0 and sum(report.skipped.values()) == 1
    (reason,) = report.skipped
    assert "disagree" in reason and "position table (1, 4, 6)" in reason and "unpatchify (1, 6, 4)" in reason
    # given the grid, the site is rewritten
    cfg = FxditConfig.from_options({"attention": {"mode": "grat-b", "group": (2, 2), "min_tokens": 0,
                                                  "grid": (4, 6)}, "on_pass_error": "raise"})
    gm2, _ = _capture_kw(model, (torch.randn(2, 24, 12),), {})
    work = fresh_copy(gm2)
    assert rewrite_grouped_attention(work, cfg).rewritten == 1


class ImageQueriesJointKeys(nn.Module):
    """Image tokens attend the joint ``[image | text]`` keys; text tokens are only keys (with key padding)."""

    def __init__(self, hidden: int = 32, heads: int = 2, text_first: bool = False) -> None:
        super().__init__()
        self.heads, self.text_first = heads, text_first
        self.patch = nn.Conv2d(4, hidden, 2, 2)
        self.text_proj = nn.Linear(16, hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.kv_text = nn.Linear(hidden, 2 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.extra: torch.Tensor | None = None  # the oracle's [S_img, S_kv] mask, when set

    def forward(self, x: torch.Tensor, text: torch.Tensor, text_valid: torch.Tensor) -> torch.Tensor:
        img = self.patch(x).flatten(2).transpose(1, 2)
        q, k, v = self.qkv(img).chunk(3, dim=-1)
        tk, tv = self.kv_text(self.text_proj(text)).chunk(2, dim=-1)
        k = torch.cat([tk, k] if self.text_first else [k, tk], dim=1)
        v = torch.cat([tv, v] if self.text_first else [v, tv], dim=1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        ones = torch.ones_like(text_valid[:, :1]).expand(-1, img.shape[1])
        valid = torch.cat([text_valid, ones] if self.text_first else [ones, text_valid], dim=1)
        mask = valid[:, None, None, :]
        if self.extra is not None:
            mask = mask & self.extra
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(o.transpose(1, 2).flatten(2))


@pytest.mark.parametrize("text_first", [False, True])
def test_image_queries_over_joint_image_text_keys(text_first):
    torch.manual_seed(0)
    model = ImageQueriesJointKeys(text_first=text_first).eval()
    x, text = torch.randn(2, 4, 16, 16), torch.randn(2, 6, 16)
    valid = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    gm, inputs = _capture_kw(model, (x, text, valid), {})
    (site,) = fxdit_meta(gm)["attention_sites"]
    kv_img = (6, 70) if text_first else (0, 64)
    assert (site.span_source, site.cross, site.image_span, site.kv_image_span) == ("joint_kv", False, (0, 64), kv_img)
    cfg = FxditConfig.from_options({"attention": {"mode": "grat-b", "group": (2, 2), "radius": 1, "min_tokens": 0},
                                    "on_pass_error": "raise"})
    work = fresh_copy(gm)
    report = rewrite_grouped_attention(work, cfg)
    assert report.rewritten == 1
    with torch.no_grad():
        out = work(*inputs, *lifted_constants(work))
        out = out[0] if isinstance(out, (tuple, list)) else out
        dense = model(x, text, valid)
        full = grat_mask((8, 8), (2, 2), 1, 70, 6 if text_first else 0)
        model.extra = full[6:, :] if text_first else full[:64, :]
        ref = model(x, text, valid)
        model.extra = None
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    assert (out - dense).abs().max() > 1e-3


class BrokenJointSequence(nn.Module):
    """Patch embedding in one graph, attention in the next (a graph break between), and the joint sequence
    assembled row by row in a zero buffer (caption, then image, then unwritten padding), as Lumina2 does."""

    def __init__(self, hidden: int = 32, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.patch = nn.Conv2d(4, hidden, 2, 2)
        self.text_proj = nn.Linear(16, hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        img = self.patch(x).flatten(2).transpose(1, 2)
        torch._dynamo.graph_break()
        t = self.text_proj(text)
        b, n_txt, n_img = t.shape[0], t.shape[1], img.shape[1]
        seq = img.new_zeros(b, n_txt + n_img + 2, img.shape[2])
        for i in range(b):
            seq[i, :n_txt] = t[i]
            seq[i, n_txt:n_txt + n_img] = img[i]
        q, k, v = self.qkv(seq).chunk(3, dim=-1)
        q, k, v = (y.unflatten(-1, (self.heads, -1)).transpose(1, 2) for y in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v)
        return self.out(o.transpose(1, 2).flatten(2))


def test_layout_carried_across_a_graph_break_into_a_row_assembled_sequence(no_inductor):
    import fxdit

    torch.manual_seed(0)
    model = BrokenJointSequence().eval()
    x, text = torch.randn(2, 4, 16, 16), torch.randn(2, 5, 16)
    options = {"attention": {"mode": "grat-b", "group": (2, 2), "radius": 1, "min_tokens": 0}}
    compiled = torch.compile(model, backend="fxdit", options=options)
    with torch.no_grad():
        out = compiled(x, text)
        dense = model(x, text)
        with masked_sdpa(grat_mask((8, 8), (2, 2), 1, 71, 5)):
            ref = model(x, text)
    records = fxdit.reports(compiled)
    assert len(records) == 2
    first, second = records
    assert first.summary["token_grid"] == (1, 8, 8) and first.summary["attention_sites"] == 0
    assert second.summary["token_grid"] == (1, 8, 8)
    rewrite = next(r for r in second.reports if r.name == "rewrite_grouped_attention")
    assert rewrite.rewritten == 1
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    assert (out - dense).abs().max() > 1e-3


def test_rows_written_with_different_layouts_leave_the_sequence_unknown(no_inductor):
    class Ragged(BrokenJointSequence):
        def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
            img = self.patch(x).flatten(2).transpose(1, 2)
            t = self.text_proj(text)
            seq = img.new_zeros(2, 5 + 64 + 2, img.shape[2])
            seq[0, :5] = t[0]
            seq[0, 5:69] = img[0]
            seq[1, :3] = t[1, :3]  # a shorter caption: the image starts elsewhere in this row
            seq[1, 3:67] = img[1]
            q, k, v = self.qkv(seq).chunk(3, dim=-1)
            q, k, v = (y.unflatten(-1, (self.heads, -1)).transpose(1, 2) for y in (q, k, v))
            return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))

    torch.manual_seed(0)
    gm, _ = _capture_kw(Ragged().eval(), (torch.randn(2, 4, 16, 16), torch.randn(2, 5, 16)), {})
    (site,) = fxdit_meta(gm)["attention_sites"]
    assert site.span_source == "ragged"
    cfg = FxditConfig.from_options({"attention": {"mode": "grat-b", "group": (2, 2), "min_tokens": 0},
                                    "on_pass_error": "raise"})
    report = rewrite_grouped_attention(fresh_copy(gm), cfg)
    assert report.rewritten == 0 and report.skipped == {R_RAGGED: 1}


class ExpandedKeyPadding(ImageQueriesJointKeys):
    """Joint ``[image | text]`` self-attention whose key-padding mask is broadcast to ``[B, H, S, S]`` first."""

    def forward(self, x: torch.Tensor, text: torch.Tensor, text_valid: torch.Tensor) -> torch.Tensor:
        img = self.patch(x).flatten(2).transpose(1, 2)
        seq = torch.cat([img, self.text_proj(text)], dim=1)
        q, k, v = self.qkv(seq).chunk(3, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        ones = torch.ones_like(text_valid[:, :1]).expand(-1, img.shape[1])
        valid = torch.cat([ones, text_valid], dim=1)
        s = valid.shape[1]
        mask = valid[:, None, None, :].expand(-1, self.heads, s, s)
        if self.extra is not None:
            mask = mask & self.extra
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(o.transpose(1, 2).flatten(2))


def test_key_padding_mask_broadcast_over_heads_and_queries():
    torch.manual_seed(0)
    model = ExpandedKeyPadding().eval()
    x, text = torch.randn(2, 4, 16, 16), torch.randn(2, 6, 16)
    valid = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    gm, inputs = _capture_kw(model, (x, text, valid), {})
    cfg = FxditConfig.from_options({"attention": {"mode": "grat-b", "group": (2, 2), "radius": 1, "min_tokens": 0},
                                    "on_pass_error": "raise"})
    work = fresh_copy(gm)
    report = rewrite_grouped_attention(work, cfg)
    assert report.rewritten == 1
    (op,) = [n for n in work.graph.nodes if n.target is OP]
    assert op.args[10] is not None  # key validity from the mask's source
    with torch.no_grad():
        out = work(*inputs, *lifted_constants(work))
        out = out[0] if isinstance(out, (tuple, list)) else out
        dense = model(x, text, valid)
        model.extra = grat_mask((8, 8), (2, 2), 1, 70, 0)
        ref = model(x, text, valid)
        model.extra = None
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    assert (out - dense).abs().max() > 1e-3


class RefinedJointSequence(BrokenJointSequence):
    """An image-only refiner attention, then the joint sequence assembled row by row and two joint layers (Lumina2's
    shape without the graph break): the refiner reads the token stream, the joint layers read the buffer."""

    def _attend(self, seq: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(seq).chunk(3, dim=-1)
        q, k, v = (y.unflatten(-1, (self.heads, -1)).transpose(1, 2) for y in (q, k, v))
        return seq + self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        img = self._attend(self.patch(x).flatten(2).transpose(1, 2))
        t = self.text_proj(text)
        b, n_txt, n_img = t.shape[0], t.shape[1], img.shape[1]
        seq = img.new_zeros(b, n_txt + n_img, img.shape[2])
        for i in range(b):
            seq[i, :n_txt] = t[i]
            seq[i, n_txt:] = img[i]
        return self._attend(self._attend(self._attend(seq)))


def test_sites_reading_a_buffer_filled_from_the_stream_are_not_hoisted():
    torch.manual_seed(0)
    model = RefinedJointSequence().eval()
    x, text = torch.randn(2, 4, 16, 16), torch.randn(2, 5, 16)
    gm, report = _rewrite_and_compare_masks(model, (x, text), [grat_mask((8, 8), (2, 2), 1, 64, 0),
                                                               grat_mask((8, 8), (2, 2), 1, 69, 5)])
    assert report.rewritten == 4
    assert not report.details["hoisted"] and "does not read the permuted token stream" in report.details["hoist_reason"]


def _rewrite_and_compare_masks(model, args, masks):
    gm, inputs = _capture_kw(model, args, {})
    cfg = FxditConfig.from_options({"attention": {"mode": "grat-b", "group": (2, 2), "radius": 1, "min_tokens": 0},
                                    "on_pass_error": "raise"})
    work = fresh_copy(gm)
    report = rewrite_grouped_attention(work, cfg)
    with torch.no_grad():
        out = work(*inputs, *lifted_constants(work))
        out = out[0] if isinstance(out, (tuple, list)) else out
        dense = _first(model(*args))
        with masked_sdpa(*masks):
            ref = _first(model(*args))
    torch.testing.assert_close(out, ref, atol=5e-5, rtol=1e-4)
    assert (out - dense).abs().max() > 1e-3
    return gm, report


@pytest.mark.parametrize("axes", [3, 4])
def test_position_ids_give_the_grid_only_in_raster_order(axes):
    from fxdit.passes._streams import _ids_grid

    gm = torch.fx.symbolic_trace(nn.Identity())
    h, w = torch.meshgrid(torch.arange(4), torch.arange(6), indexing="ij")
    cols = [torch.zeros(24, dtype=torch.int64), h.reshape(-1), w.reshape(-1)]
    if axes == 4:
        cols.append(torch.zeros(24, dtype=torch.int64))  # Flux 2's fourth axis
    raster = torch.stack(cols, dim=1)
    fxdit_meta(gm)["position_ids"] = {"img_ids": raster}
    assert _ids_grid(gm, 24).shape == (1, 4, 6)
    fxdit_meta(gm)["position_ids"] = {"img_ids": raster[torch.randperm(24, generator=torch.Generator().manual_seed(0))]}
    assert _ids_grid(gm, 24) is None  # tokens not in raster order: no grid rather than a wrong one
