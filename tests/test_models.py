"""fxdit.apps.models: every named model builds and runs; the reference DiT's config, attention forms and grids."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import fxdit.apps.models as models
from fxdit.apps.models.dit import DiT, DiTConfig, sincos_pos_embed
from fxdit.errors import FxditError

_HAS_DIFFUSERS = True
try:
    import diffusers  # noqa: F401
except ImportError:  # pragma: no cover - the dev venv has diffusers
    _HAS_DIFFUSERS = False


def _needs(name: str) -> list:
    if name in models.DIFFUSERS_NAMES and not _HAS_DIFFUSERS:
        return [pytest.mark.skip(reason="diffusers is not installed")]
    return []


ALL = [pytest.param(n, marks=_needs(n)) for n in models.names()]


def _output(out: object) -> torch.Tensor:
    """The sample tensor of a model output (diffusers returns a dataclass or a tuple)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple):
        return out[0]
    return out.sample  # type: ignore[attr-defined]


def _sample_input(spec: models.ModelSpec) -> torch.Tensor:
    x = spec.args[0] if spec.args else next(iter(spec.kwargs.values()))
    assert isinstance(x, torch.Tensor)
    return x


# ---------------------------------------------------------------------------------------------------------------
# Every named model
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_build_runs_with_expected_shape(name):
    spec = models.build(name, batch=2)
    assert spec.name == name and not spec.model.training
    assert all(p.dtype == torch.float32 for p in spec.model.parameters())
    with torch.no_grad():
        out = _output(spec.run())
    x = _sample_input(spec)
    assert out.shape[0] == 2
    assert out.shape[2:] == x.shape[2:]
    assert torch.isfinite(out).all()
    exp = spec.expected
    assert exp is not None
    assert exp.attention_sites == exp.self_attention_sites + exp.cross_attention_sites
    assert exp.blocks >= 1 and exp.tokens >= 1
    for block in range(exp.blocks if exp.linear_roles_per_block else 1):
        assert set(exp.roles(block)) == set(models.ROLES)


@pytest.mark.parametrize("name", ALL)
def test_build_is_deterministic_for_a_seed(name):
    with torch.no_grad():
        a = _output(models.build(name, seed=3).run())
        b = _output(models.build(name, seed=3).run())
        c = _output(models.build(name, seed=4).run())
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)


def test_build_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    models.build("dit-tiny", seed=7)
    assert torch.equal(torch.get_rng_state(), before)


def test_unknown_name_and_override():
    with pytest.raises(FxditError, match="dit-tiny"):
        models.build("dit-tiyn")
    with pytest.raises(FxditError, match="depht"):
        models.build("dit-tiny", depht=3)
    with pytest.raises(FxditError, match="batch"):
        models.build("dit-tiny", batch=0)


def test_overrides_follow_into_expected():
    spec = models.build("dit-tiny", depth=3, input_size=(8, 16))
    assert len(spec.model.blocks) == 3
    assert spec.expected.blocks == 3 and spec.expected.attention_sites == 3
    assert spec.expected.token_grid == (1, 4, 8)


def test_import_does_not_import_diffusers():
    code = "import sys, fxdit.apps.models, fxdit.apps.models.dit; print('diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


# ---------------------------------------------------------------------------------------------------------------
# resolve
# ---------------------------------------------------------------------------------------------------------------


def factory_spec() -> models.ModelSpec:
    return models.build("dit-tiny", depth=1)


def factory_tuple():
    lin = torch.nn.Linear(3, 2)
    return lin, (torch.randn(1, 3),), {}


def factory_bad():
    return 42


def test_resolve_name_and_factories():
    assert models.resolve("dit-tiny").name == "dit-tiny"
    spec = models.resolve(f"{__name__}:factory_spec")
    assert spec.expected.blocks == 1
    spec = models.resolve(f"{__name__}:factory_tuple")
    assert spec.expected is None and spec.run().shape == (1, 2)
    with pytest.raises(FxditError, match="factory_bad"):
        models.resolve(f"{__name__}:factory_bad")
    with pytest.raises(FxditError, match="nothere"):
        models.resolve(f"{__name__}:nothere")
    with pytest.raises(FxditError, match="no_such_module_xyz"):
        models.resolve("no_such_module_xyz:f")
    with pytest.raises(FxditError, match="dit-tiyn"):
        models.resolve("dit-tiyn")


# ---------------------------------------------------------------------------------------------------------------
# Reference DiT
# ---------------------------------------------------------------------------------------------------------------


def _dit_out(cfg: DiTConfig, *, batch: int = 2, seed: int = 0, text: bool = False) -> torch.Tensor:
    torch.manual_seed(seed)
    m = DiT(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, cfg.in_channels, *cfg.input_size, generator=g)
    t = torch.tensor([10.0, 700.0][:batch])
    y = torch.tensor([1, cfg.num_classes][:batch])  # one real label, one null class
    txt = torch.randn(batch, cfg.text_tokens, cfg.text_dim or cfg.hidden, generator=g) if text else None
    with torch.no_grad():
        return m(x, t, y, txt)


@pytest.mark.parametrize("input_size,patch,text_tokens,position", [
    ((16, 16), 2, 0, "before"), ((8, 12), (2, 4), 5, "before"), ((16, 16), 2, 5, "after"),
    ((4, 8, 8), 2, 0, "before"), ((4, 8, 8), (2, 2, 2), 5, "after"),
])
def test_attention_forms_agree(input_size, patch, text_tokens, position):
    outs = {
        form: _dit_out(DiTConfig(input_size=input_size, patch=patch, attention=form, text_tokens=text_tokens,
                                 text_dim=24 if text_tokens else None, text_position=position),
                       text=bool(text_tokens))
        for form in ("sdpa", "unfused", "unfused_prescaled")
    }
    ref = outs["sdpa"]
    assert ref.shape == (2, 4, *input_size)
    assert ref.abs().mean() > 0.05  # random weights: the output is not trivially zero
    for form in ("unfused", "unfused_prescaled"):
        torch.testing.assert_close(outs[form], ref, rtol=1.3e-6 * 16, atol=1e-5 * 4)


def test_text_position_changes_nothing_but_order():
    """Attention is permutation-equivariant: text before or after the image tokens gives the same output."""
    before = _dit_out(DiTConfig(text_tokens=3, text_position="before"), text=True)
    after = _dit_out(DiTConfig(text_tokens=3, text_position="after"), text=True)
    none = _dit_out(DiTConfig(), text=False)
    torch.testing.assert_close(before, after, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, none, atol=1e-3)


def test_learn_sigma_and_grid():
    cfg = DiTConfig(learn_sigma=True, input_size=(4, 8, 8), patch=(1, 2, 2))
    assert cfg.grid == (4, 4, 4) and cfg.tokens == 64 and cfg.out_channels == 8
    assert _dit_out(cfg).shape == (2, 8, 4, 8, 8)
    assert isinstance(DiT(cfg).x_embedder, torch.nn.Conv3d)
    assert isinstance(DiT(DiTConfig()).x_embedder, torch.nn.Conv2d)


def test_unpatchify_inverts_patchify():
    for cfg in (DiTConfig(input_size=(8, 12), patch=(2, 4)), DiTConfig(input_size=(4, 8, 8), patch=(2, 2, 2))):
        m = DiT(cfg)
        x = torch.randn(2, cfg.in_channels, *cfg.input_size)
        nd = len(cfg.input_size)
        grid = [s // p for s, p in zip(cfg.input_size, cfg.patch_size)]
        # patchify by hand: (b, c, g0, p0, g1, p1, ...) -> (b, g0, g1, .., p0, p1, .., c)
        split = x.reshape(2, cfg.in_channels, *[v for gp in zip(grid, cfg.patch_size) for v in gp])
        perm = [0] + [2 + 2 * a for a in range(nd)] + [3 + 2 * a for a in range(nd)] + [1]
        tokens = split.permute(*perm).reshape(2, cfg.tokens, -1)
        assert torch.equal(m.unpatchify(tokens), x)


def test_module_structure():
    m = DiT(DiTConfig(depth=3))
    assert isinstance(m.blocks, torch.nn.ModuleList) and len(m.blocks) == 3
    b = m.blocks[0]
    assert b.attn.qkv.out_features == 3 * 64 and b.attn.proj.in_features == 64
    assert b.mlp.fc1.out_features == 256 and b.mlp.fc2.in_features == 256
    assert b.adaLN_modulation[-1].out_features == 6 * 64
    assert not b.norm1.elementwise_affine
    z = DiT(DiTConfig(zero_init=True))
    assert torch.count_nonzero(z.blocks[0].adaLN_modulation[-1].weight) == 0


def test_pos_embed_is_fixed_sincos():
    e2 = sincos_pos_embed(64, (8, 8))
    e3 = sincos_pos_embed(64, (4, 4, 4))
    assert e2.shape == (64, 64) and e3.shape == (64, 64)
    assert len({tuple(r.tolist()) for r in e3}) == 64  # every position distinct
    assert not any(p.shape == e2[None].shape for p in DiT().parameters())


@pytest.mark.parametrize(
    "field,value",
    [
        ("depth", 0), ("hidden", 66), ("heads", 0), ("patch", 3), ("patch", (2, 2, 2)), ("input_size", (16,)),
        ("input_size", "16"), ("attention", "flash"), ("text_position", "middle"), ("mlp_ratio", 0),
        ("num_classes", -1), ("text_tokens", -2), ("text_dim", 0), ("learn_sigma", 1),
    ],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(FxditError, match=field):
        DiTConfig(**{field: value})


def test_missing_inputs_raise():
    m = DiT(DiTConfig(text_tokens=2))
    x, t = torch.randn(1, 4, 16, 16), torch.zeros(1)
    with pytest.raises(FxditError, match="text"):
        m(x, t, torch.zeros(1, dtype=torch.long))
    with pytest.raises(FxditError, match="y"):
        DiT()(x, t)
    assert DiT(DiTConfig(num_classes=0))(x, t).shape == x.shape


# ---------------------------------------------------------------------------------------------------------------
# Expected agrees with the Dynamo graph (Dynamo tracing only, no inductor)
# ---------------------------------------------------------------------------------------------------------------

#: Module-path suffix -> linear role, the convention documented in fxdit.apps.models.tiny.
_ROLE_BY_PATH = [
    (r"(^|\.)(to_q|add_q_proj)$", "q"), (r"(^|\.)(to_k|add_k_proj)$", "k"), (r"(^|\.)(to_v|add_v_proj)$", "v"),
    (r"\.qkv$", "qkv"), (r"(to_out\.0|to_add_out|attn\.proj)$", "attn_out"),
    (r"(net\.0\.proj|proj_mlp|mlp\.fc1)$", "mlp_in"), (r"(net\.2|mlp\.fc2)$", "mlp_out"),
    (r"(norm1\.linear|norm1_context\.linear|norm\.linear|adaLN_modulation\.1)$", "modulation"),
]
_BLOCK_PATH = r"^((?:transformer_blocks|single_transformer_blocks|blocks)\.\d+)\."
#: diffusers' DiTTransformer2DModel calls transformer_blocks[0].norm1.emb once more after the last block (for the
#: output adaLN): two timestep-MLP linears carry block 0's module path although they run outside the block.
_PATH_EXTRA = {"diffusers-dit": {0: {"other": 2}}}


def _role(path: str) -> str:
    import re

    for pattern, role in _ROLE_BY_PATH:
        if re.search(pattern, path):
            return role
    return "other"


GRAPH_CASES = [pytest.param(n, {}, marks=_needs(n), id=n) for n in models.names()] + [
    pytest.param("sd3", {"dual_attention_layers": (0,)}, id="sd3-dual", marks=_needs("sd3")),
    pytest.param("dit-tiny", {"text_tokens": 4, "text_position": "after"}, id="dit-tiny-text"),
]


@pytest.mark.parametrize("name,overrides", GRAPH_CASES)
def test_expected_matches_the_graph(name, overrides):
    import re
    from collections import Counter

    from fxdit.passes._fx_utils import module_path

    spec = models.build(name, **overrides)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        torch.compile(spec.model, backend=record, fullgraph=True)(*spec.args, **spec.kwargs)
    assert len(graphs) == 1
    graph = graphs[0].graph
    exp = spec.expected

    # Attention sites: count, kind of each call in graph order (sequence lengths against spans and grid), block.
    n_img = exp.tokens
    n_txt = 0 if exp.text_span is None else exp.text_span[1] - exp.text_span[0]
    if exp.image_span is not None:
        assert exp.image_span[1] - exp.image_span[0] == n_img
    block_paths = list(dict.fromkeys(
        m.group(1) for n in graph.nodes if (m := re.match(_BLOCK_PATH, module_path(n) + "."))
    ))
    if "unfused" in name:
        attn = [n for n in graph.nodes if n.op == "call_function" and n.target is torch.softmax]
        assert len(attn) == exp.attention_sites
    else:
        attn = [n for n in graph.nodes
                if n.op == "call_function" and n.target is torch._C._nn.scaled_dot_product_attention]
        kinds, blocks = [], []
        for node in attn:
            q = node.args[0] if node.args else node.kwargs["query"]
            k = node.args[1] if len(node.args) > 1 else node.kwargs["key"]
            q_len, kv_len = q.meta["example_value"].shape[-2], k.meta["example_value"].shape[-2]
            if q_len != kv_len:
                assert q_len == n_img
                kinds.append("cross")
            elif q_len == n_img + n_txt and n_txt:
                kinds.append("joint")
            elif q_len == n_img:
                kinds.append("image")
            else:
                kinds.append("text")
            match = re.match(_BLOCK_PATH, module_path(node) + ".")
            blocks.append(block_paths.index(match.group(1)) if match else None)
        assert tuple(kinds) == exp.site_kinds
        assert tuple(blocks) == exp.site_blocks
        assert len(attn) == exp.attention_sites
        assert kinds.count("cross") == exp.cross_attention_sites
        assert len(kinds) - kinds.count("cross") == exp.self_attention_sites
        assert kinds.count("text") == exp.text_only_attention_sites

    # Blocks and linear roles per block, by module path.
    per_block: dict[str, Counter] = {}
    for node in graph.nodes:
        if node.op == "call_function" and node.target is torch._C._nn.linear:
            path = module_path(node)
            match = re.match(_BLOCK_PATH, path)
            if match:
                per_block.setdefault(match.group(1), Counter())[_role(path)] += 1
    assert len(per_block) == exp.blocks
    for i, counts in enumerate(per_block.values()):
        want = Counter({r: c for r, c in exp.roles(i).items() if c})
        want.update(_PATH_EXTRA.get(name, {}).get(i, {}))
        assert dict(counts) == dict(want), f"block {i}"


@pytest.mark.skipif(not _HAS_DIFFUSERS, reason="diffusers is not installed")
def test_tiny_overrides():
    from fxdit.apps.models import tiny

    spec = models.build("wan", num_layers=1, frames=2)
    assert len(spec.model.blocks) == 1
    assert spec.expected.blocks == 1 and spec.expected.token_grid == (2, 4, 6)
    assert spec.args[0].shape[2] == 2
    assert tiny.expected_for("flux", num_single_layers=3).blocks == 4
    with pytest.raises(FxditError, match="num_layer"):
        models.build("wan", num_layer=1)
    with pytest.raises(FxditError, match="flx"):
        tiny.build("flx")
