"""End to end: torch.compile(model, backend="fxdit") with grouped attention equals eager with the grouped mask.

The oracle (tests/grat_oracle.py) patches SDPA in the *eager* model so that the calls its stated rule selects (the
self-attention calls of the transformer blocks) apply the dense boolean mask built from the model's own config, in
the model's own token order, AND-ed with the model's key-padding mask; it shares no code with fxdit's GRAT pass,
layouts or ops. The compiled model runs the rewritten graph through inductor (on CPU the op lowers to inductor's
compiled FlexAttention, key-padding masks included). Every comparison also
shows that the grouped pattern changed the output, so a rewrite that silently stayed dense fails.

Two small cases run in the default suite (one inductor compile each); whole-model compiles of the larger tiny models
take 30-70 s on the shared 2-core machine and are ``slow`` (``pytest -m slow tests/test_grat_e2e.py``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from grat_oracle import ModelLayout, grouped_sdpa, model_layout
from torch import nn
from torch._inductor.kernel.flex.flex_cpu import check_cpu_supported
from torch._inductor.utils import run_and_get_code

import fxdit
import fxdit.apps.models as M
from fxdit.apps.models import output_tensor
from fxdit.apps.models.dit import DiT, DiTConfig


def _run(model, args, kwargs, attention, *, expect_rewritten, expect_hoisted=True, layout=None, flex=False):
    options = {"attention": {"min_tokens": 0, **attention}, "on_pass_error": "raise"}
    with torch.no_grad():
        with grouped_sdpa(model, options, layout=layout) as calls:
            expected = output_tensor(model(*args, **kwargs))
        dense = output_tensor(model(*args, **kwargs))
        torch._dynamo.reset()
        fast = torch.compile(model, backend="fxdit", options=options)
        out, code = run_and_get_code(lambda: output_tensor(fast(*args, **kwargs)))
    if flex and check_cpu_supported():  # the sparse CPU path: inductor's C++ FlexAttention template
        assert any("kviStrideB" in c for c in code)  # the template reads the block tables
    # the oracle's rule selects the sites the pass rewrites, and each of them really drops attention
    assert calls["masked"] == calls["sparse"] == expect_rewritten
    # fp32 compiled vs eager through several blocks: reassociation noise reaches ~6e-5; a wrong mask errs by O(0.1)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    assert (out - dense).abs().max() > 1e-2  # the grouped pattern changed the result: the check has teeth
    records = fxdit.reports(model)
    assert len(records) == 1
    report = records[0].report("rewrite_grouped_attention")
    assert report is not None and report.rewritten == expect_rewritten
    assert report.details["hoisted"] is expect_hoisted
    assert torch._dynamo.utils.counters["fxdit"]["rewrite_grouped_attention"] == expect_rewritten
    return report


def _dit(**overrides):
    cfg = DiTConfig(**{"depth": 2, "hidden": 32, "heads": 2, "input_size": (32, 32), "num_classes": 4, **overrides})
    torch.manual_seed(0)
    model = DiT(cfg).eval()
    args = (torch.randn(2, cfg.in_channels, *cfg.input_size), torch.tensor([3.0, 700.0]), torch.tensor([1, 2]))
    kwargs = {}
    if cfg.text_tokens:
        kwargs["text"] = torch.randn(2, cfg.text_tokens, cfg.text_dim or cfg.hidden)
    return model, args, kwargs


# --------------------------------------------------------------------------------------------- default suite


def test_compiled_dit_grat_b_non_square_grid_with_text():
    """Inductor's CPU FlexAttention: GRAT-B on an 8×16 token grid (2×4 groups: H and W differ, so a swapped grid
    or a wrong radius gives another mask) with 5 joint text tokens before the image tokens."""
    model, args, kwargs = _dit(depth=1, input_size=(16, 32), text_tokens=5, text_position="before")
    assert model_layout(model, args, kwargs).grid == (8, 16)
    report = _run(model, args, kwargs, {"mode": "grat-b", "group": (4, 4), "radius": 1}, expect_rewritten=1,
                  flex=True)
    assert report.details["permutes_saved"] > 0


class _JointBlock(nn.Module):
    """Joint [image | text] attention (one fused qkv, SDPA with the key mask) and an MLP on the image tokens."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, h: torch.Tensor, txt: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, n, c = h.shape
        x = torch.cat([self.norm(h), txt], dim=1)
        q, k, v = self.qkv(x).view(b, x.shape[1], 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        h = h + self.proj(o.transpose(1, 2).reshape(b, x.shape[1], c)[:, :n])
        return h + self.fc2(F.gelu(self.fc1(h)))


class _PaddedTextModel(nn.Module):
    """A tiny joint text+image model with a boolean key-padding mask ``[B, 1, 1, N + L]`` over its padded text.

    Patch embedding ``Conv2d(4, 32, 2, 2)`` on a ``4 × 16 × 24`` latent (token grid 8×12, image tokens first), one
    joint block, a per-token output projection and the unpatchify.
    """

    def __init__(self, dim: int = 32, heads: int = 2, text_dim: int = 8) -> None:
        super().__init__()
        self.patch = 2
        self.embed = nn.Conv2d(4, dim, self.patch, self.patch)
        self.text_proj = nn.Linear(text_dim, dim)
        self.blocks = nn.ModuleList([_JointBlock(dim, heads)])
        self.out = nn.Linear(dim, 4 * self.patch * self.patch)

    def forward(self, x: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        b, _, hh, ww = x.shape
        gh, gw = hh // self.patch, ww // self.patch
        h = self.embed(x).flatten(2).transpose(1, 2)
        txt = self.text_proj(text)
        image_keep = torch.ones(b, h.shape[1], dtype=torch.bool, device=x.device)
        keep = torch.cat([image_keep, text_mask.bool()], dim=1)[:, None, None, :]
        for block in self.blocks:
            h = block(h, txt, keep)
        y = self.out(h).view(b, gh, gw, self.patch, self.patch, 4)
        return y.permute(0, 5, 1, 3, 2, 4).reshape(b, 4, hh, ww)


def test_compiled_joint_model_with_key_padding_mask():
    """Padded text keys masked by the model's own key-padding mask (a different amount per sample), GRAT-X on a
    2×3 group grid, compiled through inductor's CPU FlexAttention (one call per sample, each reading that sample's
    key validity)."""
    torch.manual_seed(0)
    model = _PaddedTextModel().eval()
    text_mask = torch.ones(2, 6, dtype=torch.long)
    text_mask[0, 4:] = 0
    text_mask[1, 2:] = 0
    args = (torch.randn(2, 4, 16, 24), torch.randn(2, 6, 8), text_mask)
    # the token grid from the latent size and the patch; image tokens first, then the text
    layout = ModelLayout((16 // model.patch, 24 // model.patch), text_first=False)
    _run(model, args, {}, {"mode": "grat-x", "group": (4, 4)}, expect_rewritten=1, layout=layout, flex=True)


# --------------------------------------------------------------------------------------------- slow


@pytest.mark.slow
def test_reference_dit_grat_b():
    model, args, kwargs = _dit()
    report = _run(model, args, kwargs, {"mode": "grat-b", "group": (4, 4), "radius": 0}, expect_rewritten=2)
    assert report.details["permutes_saved"] > 0


@pytest.mark.slow
def test_reference_dit_grat_x():
    model, args, kwargs = _dit()
    _run(model, args, kwargs, {"mode": "grat-x", "group": (8, 8)}, expect_rewritten=2)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["grat-b", "grat-x"])
def test_reference_video_dit(mode):
    model, args, kwargs = _dit(input_size=(4, 16, 16), hidden=48, patch=(1, 2, 2))
    _run(model, args, kwargs, {"mode": mode, "group": (2, 4, 4), "radius": 0}, expect_rewritten=2)


@pytest.mark.slow
@pytest.mark.parametrize("name, attention, rewritten", [
    ("sd3", {"group": (4, 4)}, 2),
    ("flux", {"group": (4, 4), "grid": (8, 12)}, 2),  # text first
    # bool key-padding mask -> kv_valid (CPU FlexAttention reads it in its mask_mod); refiner stays dense.
    ("hunyuan-video", {"group": (1, 2, 3)}, 2),
    ("wan", {"group": (2, 2, 3)}, 2),  # cross-attention stays dense
    ("pixart-alpha", {"group": (4, 4)}, 2),  # self-attention only
])
@pytest.mark.parametrize("mode", ["grat-b", "grat-x"])
def test_diffusers_tiny_models(name, attention, rewritten, mode):
    spec = M.build(name, batch=2)
    _run(spec.model, spec.args, spec.kwargs, {"mode": mode, "radius": 0, **attention}, expect_rewritten=rewritten)
