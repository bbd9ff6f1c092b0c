"""plan_cache: choose the linear layers increment-calibrated caching (ICC) caches, and check their factors.

Analysis only: the graph is not changed. The plan goes to ``fxdit_meta(gm)["cache_plan"]`` (plain data) and the
backend, seeing it, builds the two graph variants (:mod:`~fxdit.passes.record_linear_caches` for full steps,
:mod:`~fxdit.passes.insert_lowrank_increments` for cached steps) and the step runtime
(:func:`fxdit.runtime.build_cached_runtime`).

Which linears: those ``find_blocks`` labelled with a role in ``cfg.cache.roles`` (a subset of
:data:`fxdit.config.CACHE_ROLES`, the one table of cacheable roles), inside the blocks ``cfg.cache.blocks``.
In ``"increment"`` mode each needs factors ``(A, B)`` (``A`` is ``(out, r)``, ``B`` is ``(r, in)``) under the
linear's module path, or, for a fused qkv linear with ``cfg.cache.qkv == "separate"``, under ``"path:q"``,
``"path:k"`` and ``"path:v"``. A planned linear without factors is an :class:`~fxdit.errors.FxditError` (a file for
another model, or calibrated with the other ``qkv`` form); narrow ``cache.blocks``/``cache.roles`` to cache only
the layers a partial file covers. Factors for modules this graph lacks are ignored (a graph break splits a model's
linears over several graphs, each checks its own); they cannot change any output. A linear
whose factors have rank ``>= min(in, out)`` gains nothing from an increment (it would cost at least as much as
the exact product): it stays exact at cached steps and is marked ``exact`` in the plan.

The factor fingerprint is checked against the real weights: Dynamo graph placeholders carry their example
tensor in ``meta["grapharg"]``; when that is not available the plan records the weight placeholder's input
index and :func:`fxdit.runtime.build_cached_runtime` checks it from the example inputs instead.

The timestep input (used by the runtime to notice a new sampling run and the two calls of classifier-free
guidance) is the graph input with at most one dimension from which a ``sin``/``cos`` is reached within a few
operations (the sinusoidal timestep embedding); a Python-number timestep that Dynamo specialised into the
graph has no input and is not tracked. Guidance-distilled models (Flux, HunyuanVideo) embed their guidance
scale the same way, so a graph can have several such inputs: ``plan["timesteps"]`` lists them all (the runtime
reads them together), ``plan["timestep"]`` is the single one or ``None``.
"""

from __future__ import annotations

import copy
import logging
import os
from collections import deque
from typing import Any

import torch
import torch.fx as fx
from fxdit.kernels import torch_private
from fxdit.passes._base import PassReport, ReportBuilder, declares
from fxdit.passes._fx_utils import fake_value, fxdit_meta, nodes_by_name, shape_of
from fxdit.passes._ops import arith

from fxdit.config import CACHE_ROLES, FxditConfig
from fxdit.errors import FxditError

__all__ = ["plan_cache", "SharedRef", "load_factors", "cache_slots", "entry_factors", "QKV_PARTS", "FORMS"]

log = logging.getLogger(__name__)

#: Sub-keys of the separate q/k/v factorisation of a fused qkv weight, in row order of the weight.
QKV_PARTS = ("q", "k", "v")

#: Skip reason of a graph that runs functorch's vmap inline.
R_VMAP = "graph runs torch.vmap inline (e.g. a FlexAttention block mask built in the forward): no caching"

#: Call targets that mark a sinusoidal timestep embedding.
#: What a full step records per cached linear, by plan form: ``"x"`` keeps the linear's input X and output Y
#: (a cached step computes ``Y_c + (X - X_c)·Bᵀ·Aᵀ``); ``"projcache"`` keeps ``Z = X·Bᵀ`` instead of X
#: (``Y_c + (X·Bᵀ - Z_c)·Aᵀ``: less memory, one more low-rank GEMM per full step); ``"reuse"`` keeps Y only.
FORMS = {"x": ("x", "y"), "projcache": ("z", "y"), "reuse": ("y",)}

#: Default increment form. Measured (benchmarks/cache.md): "x" keeps full steps within a few percent of plain
#: inductor (projcache adds an r-wide GEMM per linear to every full step) at the same cached-step cost.
DEFAULT_FORM = "x"

_TIMESTEP_HOPS = 8


class SharedRef:
    """Holds an object that graph copies share instead of deep-copying (the factor tensors)."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj
        self.converted: dict[tuple[str, str, str], torch.Tensor] = {}

    def __deepcopy__(self, memo: dict[int, Any]) -> SharedRef:
        return self

    def __copy__(self) -> SharedRef:
        return self


_loaded: dict[tuple[str, float, int], Any] = {}


def load_factors(source: Any) -> Any:
    """A :class:`fxdit.calibration.Factors` from a path (loaded once per file version) or the object itself."""
    if not isinstance(source, (str, os.PathLike)):
        return source
    path = os.fspath(source)
    try:
        st = os.stat(path)
    except OSError as exc:
        raise FxditError(f"cache.factors={path!r}; expected an existing .safetensors factor file ({exc})") from exc
    key = (os.path.abspath(path), st.st_mtime, st.st_size)
    if key not in _loaded:
        from fxdit.calibration import Factors

        _loaded.clear()  # keep at most one file's tensors alive here
        _loaded[key] = Factors.load(path)
    return _loaded[key]


def cache_slots(plan: dict[str, Any]) -> list[tuple[int, str, tuple[int, ...], str]]:
    """The cache tensors of a plan, in the order full steps output them and cached steps take them.

    Returns:
        ``(entry index, kind, shape, dtype name)`` per tensor; ``kind`` is ``"x"``, ``"z"`` or ``"y"``.
    """
    form = "reuse" if plan["mode"] == "reuse" else plan["form"]
    slots = []
    for i, e in enumerate(plan["entries"]):
        if e["exact"]:
            continue
        for kind in FORMS[form]:
            if kind == "x":
                shape = tuple(e["x_shape"])
            elif kind == "z":
                shape = tuple(e["x_shape"][:-1]) + (sum(e["ranks"]),)
            else:
                shape = tuple(e["y_shape"])
            slots.append((i, kind, shape, e["dtype"]))
    return slots


def entry_factors(gm: fx.GraphModule, entry: dict[str, Any]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The factors ``([B...], [A...])`` of a plan entry, in the dtype and on the device of the linear's output.

    Converted tensors are shared by every graph copy (the full and cached variants lift the same tensors).
    """
    holder: SharedRef = fxdit_meta(gm)["cache_factors"]
    val = fake_value(nodes_by_name(gm)[entry["node"]])
    dtype, device = val.dtype, val.device
    bs, as_ = [], []
    for key in entry["keys"]:
        a, b = holder.obj.get(key)
        for part, t, out in (("B", b, bs), ("A", a, as_)):
            memo = (key, part, f"{dtype}@{device}")
            if memo not in holder.converted:
                holder.converted[memo] = t.detach().to(device=device, dtype=dtype).contiguous()
            out.append(holder.converted[memo])
    return bs, as_


def _factor_keys(module: str, role: str, cfg: FxditConfig, out_features: int) -> tuple[str, ...]:
    """Factor keys of a cached linear. A fused projection (role ``qkv``: q/k/v, or k/v alone) is factorised per
    third with ``cache.qkv="separate"`` when its rows split in three, as calibration does; else as one."""
    if role == "qkv" and cfg.cache.qkv == "separate" and out_features % len(QKV_PARTS) == 0:
        return tuple(f"{module}:{p}" for p in QKV_PARTS)
    return (module,)


def _get(factors: Any, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    if key not in factors:
        return None
    return factors.get(key)


def _missing_factors(factors: Any, lin: Any, block: int, keys: tuple[str, ...], cfg: FxditConfig) -> str:
    """The message for a cached linear the factors do not cover (another model, or the other qkv form)."""
    if lin.role == "qkv":
        other = "joint" if cfg.cache.qkv == "separate" else "separate"
        other_keys = (lin.module,) if other == "joint" else tuple(f"{lin.module}:{p}" for p in QKV_PARTS)
        if all(k in factors for k in other_keys):
            return (f"cache.qkv={cfg.cache.qkv!r}, but the factors of the fused qkv linear {lin.module} were "
                    f"calibrated with qkv={other!r}; set cache.qkv={other!r} or recalibrate")
    missing = [k for k in keys if k not in factors]
    return (f"cache.factors has no factors for {missing} ({lin.role} linear of block {block}); these factors "
            "belong to another model or cover only some layers — recalibrate for this model, or restrict "
            "cache.blocks / cache.roles to the layers they cover")


def verify_factors(factors: Any, weights: dict[str, torch.Tensor]) -> None:
    """``factors.verify`` restricted to the modules this graph holds (a graph break splits a model's linears
    over several graphs; each checks its own)."""
    fp = getattr(factors, "fingerprint", None)
    if fp is None or "names" not in fp:
        factors.verify(weights)
        return
    keep = [i for i, name in enumerate(fp["names"]) if name in weights]
    sub = {k: ([v[i] for i in keep] if isinstance(v, list) and len(v) == len(fp["names"]) else v)
           for k, v in fp.items()}
    view = copy.copy(factors)
    view.fingerprint = sub
    view.verify(weights)


def _placeholder_tensor(node: fx.Node) -> torch.Tensor | None:
    ga = node.meta.get("grapharg")
    if ga is None:
        return None
    try:
        ex = ga.example
    except Exception:  # noqa: BLE001 - an expired weak reference or a source without example
        return None
    return ex if isinstance(ex, torch.Tensor) and not isinstance(ex, torch_private.fake_tensor_types()[0]) else None


def _find_timestep(gm: fx.GraphModule) -> tuple[str, int] | None:
    """(name, input index) of the graph input that feeds the sinusoidal timestep embedding, or ``None``."""
    found = _find_timesteps(gm)
    return found[0] if len(found) == 1 else None


def _find_timesteps(gm: fx.GraphModule) -> list[tuple[str, int]]:
    """(name, input index) of every graph input that feeds a sinusoidal embedding (timestep, guidance scale)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    found = []
    for index, ph in enumerate(placeholders):
        val = fake_value(ph)
        if not isinstance(val, torch.Tensor) or val.dim() > 1 or isinstance(val, torch.nn.Parameter):
            continue
        if (ph.meta.get("fxdit") or {}).get("constant"):
            continue
        seen = {ph}
        queue = deque([(ph, 0)])
        hit = False
        while queue and not hit:
            node, depth = queue.popleft()
            for user in node.users:
                if user in seen:
                    continue
                seen.add(user)
                if arith(user) in ("sin", "cos"):
                    hit = True
                    break
                if depth + 1 < _TIMESTEP_HOPS:
                    queue.append((user, depth + 1))
        if hit:
            found.append((ph.name, index))
    return found


@declares(reads=("blocks", "attention_sites", "token_grid"),
          produces=("cache_plan", "cache_factors", "constants"))
def plan_cache(gm: fx.GraphModule, cfg: FxditConfig) -> PassReport:
    """Plan ICC for ``gm``: which linears are cached, with which factors; see the module docstring.

    Args:
        gm: a graph after ``find_blocks`` (reads ``fxdit_meta(gm)["blocks"]``).
        cfg: the fxdit config (``cfg.cache``).

    Returns:
        The report: ``matched`` cacheable linears, ``rewritten`` 0 (analysis), ``skipped`` by reason,
        ``details`` with the planned count, exact (full-rank) count and cache roles.

    Raises:
        FxditError: when the factors do not fit the weights (shape or fingerprint).
    """
    rb = ReportBuilder("plan_cache", gm, log)
    state = fxdit_meta(gm)
    cc = cfg.cache
    if not cc.enabled:
        state["cache_plan"] = None
        return rb.build()
    if any(n.op == "call_function" and getattr(n.target, "__name__", "") == "_vmap_increment_nesting"
           for n in gm.graph.nodes):
        # the graph runs a vmapped function inline (e.g. a FlexAttention block mask built in the forward); a
        # recorded cache tensor could be a batched tensor of that transform, which must not outlive the call
        rb.skip(R_VMAP)
        state["cache_plan"] = None
        return rb.build()
    blocks = state.get("blocks") or []
    nodes = nodes_by_name(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    ph_index = {n.name: i for i, n in enumerate(placeholders)}
    factors = load_factors(cc.factors) if cc.mode == "increment" else None

    entries: list[dict[str, Any]] = []
    weights: dict[str, torch.Tensor] = {}
    weight_index: dict[str, int] = {}
    for block in blocks:
        for lin in block.linears:
            if lin.role not in CACHE_ROLES:
                continue
            rb.matched += 1
            if lin.role not in cc.roles:
                rb.skip(f"role {lin.role} not in cache.roles", lin.node)
                continue
            if cc.blocks is not None and block.index not in cc.blocks:
                rb.skip("block not in cache.blocks", lin.node)
                continue
            node = nodes.get(lin.node)
            if node is None:
                rb.skip("linear node not in graph", lin.node)
                continue
            x = node.args[0] if node.args else node.kwargs.get("input")
            x_shape, y_shape = shape_of(x), shape_of(node)
            if x_shape is None or y_shape is None:
                rb.skip("dynamic or unknown shape", lin.node)
                continue
            entry: dict[str, Any] = {
                "node": lin.node, "module": lin.module, "role": lin.role, "block": block.index,
                "in_features": lin.in_features, "out_features": lin.out_features,
                "x_shape": x_shape, "y_shape": y_shape, "dtype": str(fake_value(node).dtype).replace("torch.", ""),
                "keys": (), "ranks": (), "exact": False,
            }
            if factors is not None:
                keys = _factor_keys(lin.module, lin.role, cfg, lin.out_features)
                pairs = [_get(factors, k) for k in keys]
                if any(p is None for p in pairs):
                    raise FxditError(_missing_factors(factors, lin, block.index, keys, cfg))
                out_part = lin.out_features // len(keys)
                ranks = []
                for key, (a, b) in zip(keys, pairs):
                    if tuple(a.shape) != (out_part, a.shape[1]) or tuple(b.shape) != (a.shape[1], lin.in_features):
                        raise FxditError(
                            f"cache.factors: factors {key!r} have A{tuple(a.shape)} B{tuple(b.shape)}; expected "
                            f"A ({out_part}, r) and B (r, {lin.in_features}) for the weight of {lin.module}"
                        )
                    ranks.append(int(a.shape[1]))
                entry["keys"] = keys
                entry["ranks"] = tuple(ranks)
                entry["exact"] = all(r >= min(lin.in_features, out_part) for r in ranks)
                wnode = nodes.get(lin.weight)
                if wnode is not None and wnode.op == "placeholder":
                    tensor = _placeholder_tensor(wnode)
                    if tensor is not None:
                        weights[lin.module] = tensor
                    weight_index[lin.module] = ph_index[wnode.name]
            entries.append(entry)

    verified = False
    if factors is not None and entries:
        if len(weights) == len({e["module"] for e in entries}):
            verify_factors(factors, weights)
            verified = True
    timesteps = _find_timesteps(gm)
    timestep = timesteps[0] if len(timesteps) == 1 else None
    plan = {
        "mode": cc.mode,
        "form": DEFAULT_FORM,
        "entries": entries,
        "weight_index": weight_index,
        "verified": verified,
        "timestep": timestep,
        "timesteps": tuple(timesteps),
    }
    state["cache_plan"] = plan if entries else None
    state["cache_factors"] = SharedRef(factors)
    rb.details.update({
        "planned": len(entries),
        "exact": sum(e["exact"] for e in entries),
        "roles": sorted({e["role"] for e in entries}),
        "blocks": sorted({e["block"] for e in entries if not e["exact"]}),
        "timestep_input": timestep[0] if timestep else None,
        "timestep_inputs": [name for name, _ in timesteps],
    })
    return rb.build()
