"""Low-rank factors for increment-calibrated caching (ICC): plain, channel-aware and channel-delta weighted SVD.

ICC replaces a cached linear layer ``Y = X·Wᵀ + b`` at a cached step by ``Ŷ = Y_c + (X − X_c)·Bᵀ·Aᵀ`` with
``A @ B ≈ W`` of rank ``r``. This module computes ``A`` (``[out, r]``) and ``B`` (``[r, in]``) for every cached linear
of a model and stores them in a :class:`Factors` file (safetensors; loading never executes code).

Methods (ICC, CVPR 2025, ``ccccczzy/icc`` ``func_decomp.py``/``utils_decomp.py``):

* ``"svd"``: truncated SVD of ``W``. Needs no data, only one example call to find the linears.
* ``"ca-svd"`` (channel-aware): weighted SVD with channel weights from the mean activation magnitude
  ``mean_n |Z|`` of the layer's input (right weights) and output (left weights) over calibration calls.
* ``"cd-svd"`` (channel-delta): the same with the activation *increment* ``mean_n |Z_t1 − Z_t2|`` between two
  consecutive denoising steps, i.e. exactly what the cached step multiplies by ``W − AB``.

Weighted SVD (:func:`weighted_svd`): ``W' = diag(l)·W·diag(ρ) = U S Vᵀ``, ``A = diag(l)⁻¹ U_r S_r``,
``B = V_rᵀ diag(ρ)⁻¹``: the Eckart–Young optimum of ``‖diag(l)(W − AB)diag(ρ)‖_F`` over rank-``r`` products.

Rank: one global ``rank`` (ICC uses 128) or a per-layer energy budget: the smallest ``r`` whose leading singular
values of the (weighted) matrix hold a share ``energy`` of ``Σσ²`` (the squared Frobenius norm, i.e. the
reconstruction error of the weighted matrix is at most ``√(1 − energy)·‖W'‖_F``). ICC's logged "PCA energy"
``Σσ_i/Σσ`` is kept as a diagnostic (``Factors.info[key]["pca_energy"]``) but not used to choose ranks. With both
``rank`` and ``energy``, ``rank`` caps the energy choice. A rank ``≥ min(out, in)`` gives *exact* factors
(``A = I, B = W`` or ``A = W, B = I``, so ``A @ B == W`` bit for bit); such keys are listed in ``Factors.exact``.

Example::

    import fxdit, torch
    spec = fxdit.apps.models.build("dit-tiny")
    f = fxdit.calibrate(spec.model, example=(spec.args, spec.kwargs), method="svd", rank=32)
    f.save("dit_tiny_r32.safetensors")
    f = fxdit.calibration.Factors.load("dit_tiny_r32.safetensors")
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import Tensor, nn

from fxdit.config import CACHE_ROLES, QKV_FACTORISATIONS
from fxdit.errors import FxditError, did_you_mean

__all__ = [
    "Factors",
    "Target",
    "calibrate",
    "channel_weights",
    "diffusion_calls",
    "find_targets",
    "new_trajectory",
    "select_rank",
    "weight_fingerprint",
    "weighted_svd",
    "METHODS",
]

log = logging.getLogger(__name__)

METHODS = ("svd", "ca-svd", "cd-svd")
#: One model call: ``(args, kwargs)``.
Call = tuple[tuple[Any, ...], dict[str, Any]]
CalibInputs = Union[Iterable[Call], Iterable[tuple[Call, Call]], Callable[[nn.Module], Any], None]

_FORMAT = "fxdit-factors"
_VERSION = 1
_QKV_PARTS = ("q", "k", "v")
_SVD_DTYPES = (torch.float32, torch.float64)
_FACTOR_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_WEIGHT_EPS = 1e-6  # added to channel weights before the SVD (ICC, utils_decomp.py)
_NORM_EPS = 1e-6  # min-max normalisation guard (ICC, models_stat_svd.py)
_SKETCH = 8  # random projections per weight in the fingerprint sketch


# ---------------------------------------------------------------------------------------------------------------
# Weighted SVD
# ---------------------------------------------------------------------------------------------------------------


def select_rank(singular_values: Tensor, energy: float) -> int:
    """Smallest ``r ≥ 1`` with ``Σ_{i<r} σ_i² ≥ energy · Σ σ_i²``.

    Args:
        singular_values: descending singular values.
        energy: share of the squared Frobenius norm to keep, in ``(0, 1]``.

    Returns:
        The rank (``len(singular_values)`` when ``energy == 1``; 1 for a zero matrix).
    """
    if not (isinstance(energy, (int, float)) and 0.0 < float(energy) <= 1.0):
        raise FxditError(f"energy={energy!r}; expected a number in (0, 1]")
    s2 = singular_values.double().square()
    total = float(s2.sum())
    if total <= 0.0 or len(s2) == 0:
        return 1
    if energy >= 1.0:
        # the exact-arithmetic answer, not one hostage to rounding of the cumulative sum
        nz = int((singular_values > 0).sum())
        return max(1, nz)
    share = torch.cumsum(s2, 0) / total
    return int(torch.searchsorted(share, torch.tensor(float(energy), dtype=share.dtype)).item()) + 1


@dataclass
class _LowRank:
    A: Tensor
    B: Tensor
    rank: int
    exact: bool
    energy: float  # Σ_{i<r} σ² / Σ σ² of the weighted matrix
    pca_energy: float  # Σ_{i<r} σ / Σ σ (ICC's logged diagnostic)


def _check_channel_weight(name: str, w: Tensor | None, size: int) -> Tensor | None:
    if w is None:
        return None
    if not isinstance(w, Tensor) or w.dim() != 1 or w.shape[0] != size:
        shape = tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__
        raise FxditError(f"{name} weights {shape}; expected a 1-D tensor of {size} channel weights")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise FxditError(f"{name} weights must be finite and non-negative")
    return w


def _factorize(W: Tensor, left: Tensor | None = None, right: Tensor | None = None, rank: int | None = None, *,
               energy: float | None = None, dtype: torch.dtype = torch.float32) -> _LowRank:
    if not isinstance(W, Tensor) or W.dim() != 2:
        raise FxditError(f"W: expected a 2-D weight [out, in], got {tuple(W.shape) if isinstance(W, Tensor) else W!r}")
    if dtype not in _SVD_DTYPES:
        raise FxditError(f"dtype={dtype}; expected torch.float32 or torch.float64 for the SVD")
    if rank is None and energy is None:
        raise FxditError("rank=None and energy=None; give a rank (e.g. 128) or an energy budget (e.g. 0.99)")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise FxditError(f"rank={rank!r}; expected an integer >= 1")
    out_f, in_f = W.shape
    full = min(out_f, in_f)
    left = _check_channel_weight("left (output-channel)", left, out_f)
    right = _check_channel_weight("right (input-channel)", right, in_f)
    Wd = W.detach().to(dtype)
    if rank is not None and rank >= full and energy is None:
        return _exact(Wd)
    # +eps on copies (ICC adds it in place, which makes q/k/v's shared right weight drift; harmless but avoided)
    lw = None if left is None else left.detach().to(device=Wd.device, dtype=dtype) + _WEIGHT_EPS
    rw = None if right is None else right.detach().to(device=Wd.device, dtype=dtype) + _WEIGHT_EPS
    Ww = Wd
    if lw is not None:
        Ww = lw[:, None] * Ww
    if rw is not None:
        Ww = Ww * rw[None, :]
    U, S, Vh = torch.linalg.svd(Ww, full_matrices=False)
    r = full if rank is None else min(rank, full)
    if energy is not None:
        r = min(r, select_rank(S, energy))
    if r >= full:
        return _exact(Wd)
    A = U[:, :r] * S[:r][None, :]
    B = Vh[:r, :]
    if lw is not None:
        A = A / lw[:, None]
    if rw is not None:
        B = B / rw[None, :]
    s2 = S.double().square()
    tot2, tot1 = float(s2.sum()), float(S.double().sum())
    return _LowRank(A.contiguous(), B.contiguous(), r, False,
                    float(s2[:r].sum()) / tot2 if tot2 > 0 else 1.0,
                    float(S[:r].double().sum()) / tot1 if tot1 > 0 else 1.0)


def _exact(W: Tensor) -> _LowRank:
    out_f, in_f = W.shape
    if out_f <= in_f:
        A = torch.eye(out_f, dtype=W.dtype, device=W.device)
        B = W.clone().contiguous()
    else:
        A = W.clone().contiguous()
        B = torch.eye(in_f, dtype=W.dtype, device=W.device)
    return _LowRank(A, B, min(out_f, in_f), True, 1.0, 1.0)


def weighted_svd(W: Tensor, left: Tensor | None = None, right: Tensor | None = None, rank: int | None = None, *,
                 energy: float | None = None, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Rank-``r`` factors ``A [out, r]``, ``B [r, in]`` minimising ``‖diag(l)(W − AB)diag(ρ)‖_F``.

    ``W' = diag(l + 1e-6)·W·diag(ρ + 1e-6) = U S Vᵀ`` (``torch.linalg.svd`` in ``dtype``);
    ``A = diag(l + 1e-6)⁻¹ U_r S_r``, ``B = V_rᵀ diag(ρ + 1e-6)⁻¹``. ``None`` weights mean uniform (plain SVD, no
    ``1e-6`` shift). A rank ``≥ min(out, in)`` (directly or through ``energy``) returns exact factors: ``A = I,
    B = W`` when ``out ≤ in``, else ``A = W, B = I``, so ``A @ B == W`` exactly.

    Args:
        W: ``[out, in]`` weight.
        left: ``[out]`` non-negative output-channel weights ``l`` or ``None``.
        right: ``[in]`` non-negative input-channel weights ``ρ`` or ``None``.
        rank: target rank (``None``: chosen by ``energy`` alone).
        energy: keep the smallest rank whose singular values hold this share of ``Σσ²`` of ``W'``; with
            ``rank`` too, ``rank`` is the cap.
        dtype: SVD dtype, ``torch.float32`` or ``torch.float64``; the factors come back in it.

    Returns:
        ``(A, B)``.

    Raises:
        FxditError: bad shapes, weights, rank, energy or dtype.
    """
    lr = _factorize(W, left, right, rank, energy=energy, dtype=dtype)
    return lr.A, lr.B


# ---------------------------------------------------------------------------------------------------------------
# Fingerprint of the cached weights
# ---------------------------------------------------------------------------------------------------------------


def _bytes_of(t: Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def _sketch(W: Tensor, name: str) -> list[float]:
    """``K`` Rademacher projections ``uₖᵀ W vₖ`` (fixed by the layer shape), in float64."""
    out_f, in_f = W.shape
    g = torch.Generator().manual_seed(1_000_003 * out_f + in_f)
    u = torch.randint(0, 2, (_SKETCH, out_f), generator=g, dtype=torch.int8).double().mul_(2).sub_(1)
    v = torch.randint(0, 2, (in_f, _SKETCH), generator=g, dtype=torch.int8).double().mul_(2).sub_(1)
    Wd = W.detach().double().cpu()
    return [float(x) for x in ((u @ Wd) * v.t()).sum(dim=1)]


def weight_fingerprint(weights: Mapping[str, Tensor]) -> dict[str, Any]:
    """A fingerprint of the cached linears' weights: names, shapes, dtype, per-weight sha256 and a sketch.

    The sha256 values catch any change when the weights come in the dtype they were calibrated in. The sketch
    (``K`` fixed random ±1 projections ``uᵀWv`` and ``‖W‖_F`` per weight) lets :meth:`Factors.verify` accept the
    same weights cast to another float dtype while still catching changes well above that dtype's rounding.

    Args:
        weights: module path → 2-D weight.

    Returns:
        A JSON-serialisable dict.
    """
    names = sorted(weights)
    out: dict[str, Any] = {"names": names, "shapes": [], "dtypes": [], "sha256": [], "sketch": [], "norm": []}
    for name in names:
        W = weights[name]
        out["shapes"].append(list(W.shape))
        out["dtypes"].append(str(W.dtype).replace("torch.", ""))
        out["sha256"].append(hashlib.sha256(_bytes_of(W)).hexdigest()[:32])
        out["sketch"].append(_sketch(W, name))
        out["norm"].append(float(W.detach().double().norm()))
    out["digest"] = hashlib.sha256("".join(out["sha256"]).encode()).hexdigest()[:32]
    return out


_UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}


# ---------------------------------------------------------------------------------------------------------------
# Factors
# ---------------------------------------------------------------------------------------------------------------


class Factors:
    """Low-rank factors ``A [out, r]``, ``B [r, in]`` (``A @ B ≈ W``) for a model's cached linear layers.

    Keys are module paths (``"blocks.0.attn.proj"``) or ``"path:q"``, ``"path:k"``, ``"path:v"`` for the separate
    factorisation of a fused qkv weight (rows split in three).

    Attributes:
        method: ``"svd"``, ``"ca-svd"``, ``"cd-svd"`` (or whatever the producer recorded).
        ranks: key → rank.
        exact: keys whose factors reproduce ``W`` exactly (rank ≥ min(out, in)).
        fingerprint: :func:`weight_fingerprint` of the calibrated model's cached weights (``None`` if unknown).
        info: key → ``{"module", "part", "role", "block", "energy", "pca_energy"}``.
        meta: free-form extra metadata (calibration settings).
    """

    def __init__(self, factors: Mapping[str, tuple[Tensor, Tensor]], *, method: str = "svd",
                 exact: Iterable[str] = (), fingerprint: Mapping[str, Any] | None = None,
                 info: Mapping[str, Mapping[str, Any]] | None = None, meta: Mapping[str, Any] | None = None) -> None:
        self._factors: dict[str, tuple[Tensor, Tensor]] = {}
        for key, pair in factors.items():
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise FxditError(f"factors[{key!r}]: expected a pair (A, B)")
            A, B = pair
            _check_pair(key, A, B)
            self._factors[key] = (A, B)
        self.method = method
        self.ranks: dict[str, int] = {k: int(b.shape[0]) for k, (_, b) in self._factors.items()}
        self.exact: frozenset[str] = frozenset(exact)
        unknown = self.exact - set(self._factors)
        if unknown:
            raise FxditError(f"exact keys {sorted(unknown)} have no factors")
        self.fingerprint: dict[str, Any] | None = dict(fingerprint) if fingerprint is not None else None
        self.info: dict[str, dict[str, Any]] = {k: dict(v) for k, v in (info or {}).items()}
        for key in self._factors:
            self.info.setdefault(key, _default_info(key))
        self.meta: dict[str, Any] = dict(meta or {})

    # -- access ------------------------------------------------------------------------------------------------

    def keys(self) -> list[str]:
        """Factor keys in insertion (graph) order."""
        return list(self._factors)

    def __contains__(self, key: object) -> bool:
        return key in self._factors

    def __len__(self) -> int:
        return len(self._factors)

    def __repr__(self) -> str:
        ranks = sorted(set(self.ranks.values()))
        return f"Factors(method={self.method!r}, keys={len(self)}, ranks={ranks}, exact={len(self.exact)})"

    def get(self, key: str) -> tuple[Tensor, Tensor]:
        """``(A, B)`` of ``key``.

        Raises:
            FxditError: unknown key (the message suggests a close one).
        """
        try:
            return self._factors[key]
        except KeyError:
            raise FxditError(f"factors: no key {key!r}{did_you_mean(key, self._factors)}; "
                             f"{len(self)} keys, e.g. {self.keys()[:3]}") from None

    def modules(self) -> list[str]:
        """The module paths covered (each once, in key order)."""
        return list(dict.fromkeys(self.info[k]["module"] for k in self._factors))

    def factors_for(self, module_path: str) -> list[tuple[str | None, Tensor, Tensor]]:
        """The factors of one linear: ``[(None, A, B)]`` for a whole weight, ``[("q", A, B), ("k", ...), ("v",
        ...)]`` for a separately factorised fused qkv weight, ``[]`` when the module has no factors."""
        if module_path in self._factors:
            A, B = self._factors[module_path]
            return [(None, A, B)]
        parts = []
        for p in _QKV_PARTS:
            key = f"{module_path}:{p}"
            if key in self._factors:
                A, B = self._factors[key]
                parts.append((p, A, B))
        return parts

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Factors:
        """A copy with every factor moved/cast (``dtype`` must be a float dtype)."""
        if dtype is not None and dtype not in _FACTOR_DTYPES:
            raise FxditError(f"dtype={dtype}; expected one of {[str(d) for d in _FACTOR_DTYPES]}")
        moved = {k: (a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype))
                 for k, (a, b) in self._factors.items()}
        return Factors(moved, method=self.method, exact=self.exact, fingerprint=self.fingerprint, info=self.info,
                       meta=self.meta)

    # -- verification ------------------------------------------------------------------------------------------

    def verify(self, weights: Mapping[str, Tensor], *, source: str = "the model", partial: bool = False) -> None:
        """Check that ``weights`` (module path → weight) are the ones these factors were calibrated on.

        With ``partial=True`` only the modules present in ``weights`` are checked (a graph break splits a model's
        linears over several graphs); otherwise a missing module is an error.

        Same dtype as at calibration: every weight's sha256 must match. Another float dtype: the sketch
        projections must agree within 4× that dtype's rounding (so changes of ≳1–2 % of ``‖W‖_F`` are caught even
        across fp32 → bf16).

        Raises:
            FxditError: a module is missing, a shape differs (another model) or a weight changed (fine-tuned,
                fused LoRA, ...): the message says to recalibrate.
        """
        fp = self.fingerprint
        if fp is None:
            log.warning("factors have no fingerprint; cannot check they belong to %s", source)
            return
        missing = [n for n in fp["names"] if n not in weights]
        if missing and not partial:
            raise FxditError(f"factors were calibrated for modules that {source} lacks: {missing[:5]}"
                             f"{' ...' if len(missing) > 5 else ''}; these factors belong to another model — "
                             "recalibrate (fxdit calibrate / fxdit.calibrate) for this one")
        changed, reshaped = [], []
        for i, name in enumerate(fp["names"]):
            if name not in weights:
                continue
            W = weights[name]
            if list(W.shape) != list(fp["shapes"][i]):
                reshaped.append(f"{name} {list(W.shape)} (calibrated {fp['shapes'][i]})")
                continue
            dt = str(W.dtype).replace("torch.", "")
            if dt == fp["dtypes"][i]:
                if hashlib.sha256(_bytes_of(W)).hexdigest()[:32] != fp["sha256"][i]:
                    changed.append(name)
                continue
            u = max(_UNIT_ROUNDOFF.get(dt, 2.0**-8), _UNIT_ROUNDOFF.get(fp["dtypes"][i], 2.0**-8))
            now = _sketch(W, name)
            # each projection of a rounding error E has std ‖E‖_F ≤ u·‖W‖_F; allow 4u·‖W‖_F in RMS over K
            rms = math.sqrt(sum((a - b) ** 2 for a, b in zip(now, fp["sketch"][i])) / _SKETCH)
            if rms > 4.0 * u * max(fp["norm"][i], 1e-30) + 1e-12:
                changed.append(name)
        if reshaped:
            raise FxditError(f"factor file does not match {source}: weight shapes differ for {reshaped[:3]}; these "
                             "factors belong to another model — recalibrate (fxdit calibrate / fxdit.calibrate)")
        if changed:
            raise FxditError(f"factor file does not match {source}: the weights of {len(changed)} cached linear(s) "
                             f"changed since calibration ({changed[:3]}{' ...' if len(changed) > 3 else ''}); "
                             "fine-tuned or LoRA-fused weights need new factors — recalibrate "
                             "(fxdit calibrate / fxdit.calibrate)")

    def verify_model(self, model: nn.Module) -> None:
        """:meth:`verify` against ``model``'s modules (``model.get_submodule(path).weight``)."""
        base = _unwrap(model)
        weights = {}
        for name in (self.fingerprint or {}).get("names", []):
            try:
                weights[name] = base.get_submodule(name).weight
            except AttributeError:
                continue
        self.verify(weights, source=f"model {type(base).__name__}")

    # -- files -------------------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a safetensors file: tensors ``"<key>.A"``, ``"<key>.B"``; JSON metadata under ``"fxdit"``."""
        from safetensors.torch import save_file

        tensors: dict[str, Tensor] = {}
        for key, (A, B) in self._factors.items():
            tensors[f"{key}.A"] = A.detach().contiguous().cpu()
            tensors[f"{key}.B"] = B.detach().contiguous().cpu()
        meta = {"format": _FORMAT, "version": _VERSION, "method": self.method, "keys": self.keys(),
                "ranks": self.ranks, "exact": sorted(self.exact), "fingerprint": self.fingerprint,
                "info": self.info, "meta": self.meta,
                "sha256": {name: _tensor_digest(t) for name, t in tensors.items()}}
        save_file(tensors, os.fspath(path), metadata={"format": _FORMAT, "fxdit": json.dumps(meta)})

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: torch.device | str | None = None) -> Factors:
        """Read a factor file written by :meth:`save` (safetensors only; nothing is executed).

        Raises:
            FxditError: the file is missing, not a safetensors file, corrupt or truncated, not an fxdit factor
                file, or holds inconsistent shapes, non-float dtypes or non-finite values.
        """
        from safetensors import safe_open

        p = os.fspath(path)
        if not os.path.exists(p):
            raise FxditError(f"factor file {p!r} not found (make one with `fxdit calibrate ... --out {p}`)")
        if os.path.isdir(p):
            raise FxditError(f"factor file {p!r} is a directory; expected a .safetensors file")
        try:
            dev = "cpu" if device is None else str(torch.device(device))
        except (RuntimeError, TypeError) as exc:
            raise FxditError(f"device={device!r}; expected a torch device such as 'cpu' or 'cuda' ({exc})") from None
        if dev == "meta":
            raise FxditError("device='meta'; factors need a device that holds data ('cpu' or 'cuda')")
        try:
            with safe_open(p, framework="pt", device=dev) as f:
                header = f.metadata() or {}
                if header.get("format") != _FORMAT or "fxdit" not in header:
                    raise FxditError(f"factor file {p!r} is a safetensors file but not an fxdit factor file "
                                     "(no 'fxdit' metadata); make one with `fxdit calibrate`")
                meta = json.loads(header["fxdit"])
                names = set(f.keys())
                tensors = {n: f.get_tensor(n) for n in names}
        except FxditError:
            raise
        except json.JSONDecodeError as exc:
            raise FxditError(f"factor file {p!r} has corrupt metadata ({exc}); recreate it") from None
        except Exception as exc:  # safetensors raises SafetensorError / OSError / RuntimeError
            raise FxditError(f"factor file {p!r} is corrupt or truncated ({type(exc).__name__}: {exc}); "
                             "recreate it with `fxdit calibrate`") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("keys"), list):
            raise FxditError(f"factor file {p!r} has corrupt metadata (no key list); recreate it")
        if meta.get("version") != _VERSION:
            raise FxditError(f"factor file {p!r}: unsupported format version {meta.get('version')!r} "
                             f"(this fxdit reads version {_VERSION})")
        # safetensors has no checksum: a flipped byte in tensor data loads as a different factor value
        digests = meta.get("sha256")
        if isinstance(digests, dict):
            bad = sorted(n for n, d in digests.items() if n in tensors and _tensor_digest(tensors[n]) != d)
            if bad:
                raise FxditError(f"factor file {p!r} is corrupt: tensor data of {bad[:3]} does not match the checksum "
                                 "stored at save time; recreate it with `fxdit calibrate`")
        factors: dict[str, tuple[Tensor, Tensor]] = {}
        for key in meta["keys"]:
            if f"{key}.A" not in tensors or f"{key}.B" not in tensors:
                raise FxditError(f"factor file {p!r} is incomplete: tensors for {key!r} are missing")
            A, B = tensors[f"{key}.A"], tensors[f"{key}.B"]
            try:
                _check_pair(key, A, B)
            except FxditError as exc:
                raise FxditError(f"factor file {p!r}: {exc}") from None
            if meta.get("ranks", {}).get(key, B.shape[0]) != B.shape[0]:
                raise FxditError(f"factor file {p!r}: {key!r} has rank {B.shape[0]}, metadata says "
                                 f"{meta['ranks'][key]}")
            factors[key] = (A, B)
        return cls(factors, method=meta.get("method", "svd"), exact=meta.get("exact", ()),
                   fingerprint=meta.get("fingerprint"), info=meta.get("info"), meta=meta.get("meta"))


def _tensor_digest(t: Tensor) -> str:
    return hashlib.sha256(_bytes_of(t)).hexdigest()[:32]


def _default_info(key: str) -> dict[str, Any]:
    module, sep, part = key.rpartition(":")
    if not (sep and part in _QKV_PARTS):
        module, part = key, None
    return {"module": module, "part": part, "role": None, "block": None}


def _check_pair(key: str, A: Any, B: Any) -> None:
    if not isinstance(A, Tensor) or not isinstance(B, Tensor):
        raise FxditError(f"{key!r}: A and B must be tensors")
    if A.dtype not in _FACTOR_DTYPES or B.dtype not in _FACTOR_DTYPES:
        raise FxditError(f"{key!r}: factors have dtype {A.dtype}/{B.dtype}; expected floating point "
                         "(float32, float64, float16 or bfloat16)")
    if A.dim() != 2 or B.dim() != 2 or A.shape[1] != B.shape[0] or B.shape[0] < 1:
        raise FxditError(f"{key!r}: expected A [out, r] and B [r, in], got {tuple(A.shape)} and {tuple(B.shape)}")
    if B.shape[0] > min(A.shape[0], B.shape[1]):
        raise FxditError(f"{key!r}: rank {B.shape[0]} > min(out, in) = {min(A.shape[0], B.shape[1])}; expected "
                         "1 <= r <= min(out, in) (full-rank factors already reproduce the weight exactly)")
    if A.is_meta or B.is_meta:
        raise FxditError(f"{key!r}: factors on the meta device hold no values; load them on a real device")
    if not bool(torch.isfinite(A).all()) or not bool(torch.isfinite(B).all()):
        raise FxditError(f"{key!r}: factors contain NaN or Inf")


# ---------------------------------------------------------------------------------------------------------------
# Which linears
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One cached linear to factorise.

    Attributes:
        module: module path (``model.get_submodule(module)`` is an ``nn.Linear``-like module with ``.weight``).
        role: its role (from :data:`fxdit.config.CACHE_ROLES`).
        block: block index (``-1`` when unknown).
        parts: ``("q", "k", "v")`` for the separate factorisation of a fused qkv weight, else ``()``.
    """

    module: str
    role: str
    block: int = -1
    parts: tuple[str, ...] = ()

    def keys(self) -> list[str]:
        return [f"{self.module}:{p}" for p in self.parts] if self.parts else [self.module]


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)


def _weight_of(model: nn.Module, path: str) -> Tensor:
    try:
        mod = model.get_submodule(path)
    except AttributeError:
        raise FxditError(f"module {path!r} not found in {type(model).__name__}") from None
    W = getattr(mod, "weight", None)
    if not isinstance(W, Tensor) or W.dim() != 2:
        raise FxditError(f"module {path!r} ({type(mod).__name__}) has no 2-D weight; expected an nn.Linear")
    return W


def _targets_from(model: nn.Module, entries: Iterable[tuple[str, str, int]], qkv: str) -> list[Target]:
    out: dict[str, Target] = {}
    for path, role, block in entries:
        if role not in CACHE_ROLES or path in out:
            continue
        if not path:
            log.warning("calibration: a %s linear in block %d has no module path; it gets no factors", role, block)
            continue
        W = _weight_of(model, path)
        parts: tuple[str, ...] = ()
        if role == "qkv" and qkv == "separate":
            if W.shape[0] % 3:
                log.warning("calibration: fused qkv %s has %d output rows (not divisible by 3); factorised jointly",
                            path, W.shape[0])
            else:
                parts = _QKV_PARTS
        out[path] = Target(path, role, block, parts)
    return list(out.values())


def find_targets(model: nn.Module, example: Call, *, qkv: str = "separate") -> list[Target]:
    """The cached linears of ``model`` as :func:`fxdit.analysis.analyze` labels them on ``example``.

    Args:
        model: the model (not compiled; a ``torch.compile`` wrapper is unwrapped).
        example: one call ``(args, kwargs)``.
        qkv: ``"separate"`` (fused qkv weights get keys ``path:q/k/v``) or ``"joint"``.

    Returns:
        The targets in graph order (roles from :data:`fxdit.config.CACHE_ROLES`; modulation/other never).
    """
    from fxdit.analysis import analyze

    _check_choice("qkv", qkv, QKV_FACTORISATIONS)
    base = _unwrap(model)
    args, kwargs = _check_call(example, "example")
    with torch.no_grad():
        graphs = analyze(base, *args, **kwargs)
    entries = []
    for g in graphs:
        for block in g.blocks:
            for lin in block.linears:
                entries.append((lin.module, lin.role, block.index))
    targets = _targets_from(base, entries, qkv)
    if not targets:
        raise FxditError(f"calibration: found no cacheable linear layers ({', '.join(CACHE_ROLES)}) in "
                         f"{type(base).__name__}; pass modules={{path: role}} to name them explicitly")
    return targets


# ---------------------------------------------------------------------------------------------------------------
# Channel statistics (CA-SVD / CD-SVD)
# ---------------------------------------------------------------------------------------------------------------


def _per_sample_profile(z: Tensor) -> Tensor:
    """``[B, ..., C]`` → ``[B, C]`` min-max normalised ``mean_n |z|`` (1-D input counts as one sample)."""
    z = z.detach()
    if z.dim() == 1:
        z = z[None]
    m = z.abs().float().reshape(z.shape[0], -1, z.shape[-1]).mean(dim=1)
    lo = m.amin(dim=1, keepdim=True)
    hi = m.amax(dim=1, keepdim=True)
    return (m - lo + _NORM_EPS) / (hi - lo + _NORM_EPS)


class _Recorder:
    """Forward hooks that accumulate ICC's per-channel statistics for a set of linear modules.

    ``mode``: ``"magnitude"`` (CA: every call), ``"store"`` (CD: remember activations), ``"delta"`` (CD: statistic
    of the difference to the stored activations), ``"trajectory"`` (CD: difference to the previous call of the same
    trajectory, then store).
    """

    def __init__(self, model: nn.Module, paths: Sequence[str]) -> None:
        self.model = model
        self.sums: dict[tuple[str, str], Tensor] = {}
        self.counts: dict[tuple[str, str], int] = {}
        self.prev: dict[tuple[str, int], tuple[Tensor, Tensor]] = {}
        self.mode = "magnitude"
        self.calls = 0
        self.first_call: Call | None = None
        self._occurrence: dict[str, int] = {}
        self._signature: Any = None
        self._handles = [model.register_forward_pre_hook(self._pre, with_kwargs=True)]
        for path in paths:
            self._handles.append(model.get_submodule(path).register_forward_hook(self._hook(path)))

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.prev.clear()

    def new_trajectory(self) -> None:
        self.prev.clear()

    def _pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.calls += 1
        self._occurrence.clear()
        if self.first_call is None:
            self.first_call = (tuple(args), dict(kwargs))
        sig = tuple((tuple(a.shape), a.dtype) for a in itertools.chain(args, kwargs.values())
                    if isinstance(a, Tensor))
        if self.mode == "trajectory" and sig != self._signature:
            self.prev.clear()
        self._signature = sig

    def _add(self, path: str, side: str, z: Tensor) -> None:
        mu = _per_sample_profile(z).mean(dim=0).double()
        key = (path, side)
        if key in self.sums:
            if self.sums[key].shape != mu.shape:
                raise FxditError(f"calibration: {path} {side} changed width between calls")
            self.sums[key] += mu
            self.counts[key] += 1
        else:
            self.sums[key] = mu
            self.counts[key] = 1

    def _hook(self, path: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            if not inputs or not isinstance(inputs[0], Tensor) or not isinstance(output, Tensor):
                return
            x, y = inputs[0].detach(), output.detach()
            occ = self._occurrence.get(path, 0)
            self._occurrence[path] = occ + 1
            key = (path, occ)
            if self.mode == "magnitude":
                self._add(path, "x", x)
                self._add(path, "y", y)
                return
            if self.mode in ("delta", "trajectory") and key in self.prev:
                px, py = self.prev[key]
                if px.shape == x.shape and py.shape == y.shape:
                    self._add(path, "x", x.float() - px.float())
                    self._add(path, "y", y.float() - py.float())
            if self.mode in ("store", "trajectory"):
                self.prev[key] = (x.clone(), y.clone())

        return hook

    def weights(self, path: str, alpha: float, max_ratio: float) -> tuple[Tensor | None, Tensor | None]:
        """ICC's final ``(left, right)`` weights: ``(Σμ/count)^α`` floored at ``max/max_ratio``."""
        out = []
        for side in ("y", "x"):
            key = (path, side)
            if key not in self.sums:
                out.append(None)
                continue
            w = (self.sums[key] / self.counts[key]).clamp_min(0).pow(alpha)
            out.append(torch.maximum(w, w.max() / max_ratio))
        return out[0], out[1]


_ACTIVE: list[_Recorder] = []


def new_trajectory() -> None:
    """Inside a CD-SVD ``run_trajectories`` callable: the next model call starts a new sampling trajectory.

    Calls are otherwise differenced with the previous call (a change of input shapes also starts a new
    trajectory). A no-op outside calibration.
    """
    for rec in _ACTIVE:
        rec.new_trajectory()


def channel_weights(model: nn.Module, modules: Sequence[str], calib_inputs: CalibInputs, *, method: str = "ca-svd",
                    num_samples: int = 256, alpha: float = 0.5, max_ratio: float = 1000.0, progress: bool = False,
                    ) -> dict[str, tuple[Tensor | None, Tensor | None]]:
    """ICC channel weights ``(left [out], right [in])`` of each module in ``modules``.

    See :func:`calibrate` for the forms of ``calib_inputs``. ``method="ca-svd"``: statistic ``mean_n |Z|``;
    ``"cd-svd"``: ``mean_n |Z_t1 − Z_t2|`` over consecutive calls of a trajectory (or call pairs). Per call and
    per sample the statistic is min-max normalised over channels, averaged over the batch, summed over calls, then
    ``w = (Σμ/calls)^alpha`` and ``w ← max(w, max(w)/max_ratio)``. Right weights come from the layer's input,
    left weights from its output (bias included).

    Returns:
        module path → ``(left, right)``, float64 on the activations' device. ``(None, None)`` for a module that
        never ran.
    """
    if method not in ("ca-svd", "cd-svd"):
        raise FxditError(f"method={method!r}; channel weights exist for 'ca-svd' and 'cd-svd'")
    base = _unwrap(model)
    rec = _Recorder(base, modules)
    _ACTIVE.append(rec)
    try:
        _collect(base, rec, calib_inputs, method, num_samples, progress)
    finally:
        _ACTIVE.remove(rec)
        rec.close()
    if rec.calls == 0:
        raise FxditError("calibration: calib_inputs made no model call")
    if not rec.sums:
        what = "consecutive calls to difference" if method == "cd-svd" else "calls"
        raise FxditError(f"calibration ({method}): no statistics were recorded (no {what} reached the cached "
                         "linears); check calib_inputs")
    return {path: rec.weights(path, alpha, max_ratio) for path in modules}


def _rows(call: Call) -> int:
    args, kwargs = call
    for a in itertools.chain(args, kwargs.values()):
        if isinstance(a, Tensor) and a.dim() >= 1:
            return int(a.shape[0])
    return 1


def _check_call(call: Any, what: str) -> Call:
    if (isinstance(call, (tuple, list)) and len(call) == 2 and isinstance(call[0], (tuple, list))
            and isinstance(call[1], Mapping)):
        return tuple(call[0]), dict(call[1])
    raise FxditError(f"{what}: expected one model call as (args: tuple, kwargs: dict), got {type(call).__name__}"
                     + (f" of length {len(call)}" if isinstance(call, (tuple, list)) else ""))


def _is_pair(item: Any) -> bool:
    return (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[1], (tuple, list))
            and len(item[1]) == 2 and isinstance(item[1][1], Mapping))


def _collect(model: nn.Module, rec: _Recorder, data: CalibInputs, method: str, num_samples: int,
             progress: bool) -> None:
    from tqdm.auto import tqdm

    if data is None:
        raise FxditError(f"method={method!r} needs calib_inputs (calls, call pairs or a run_trajectories callable)")
    with torch.no_grad():
        if callable(data) and not isinstance(data, (tuple, list)):
            rec.mode = "magnitude" if method == "ca-svd" else "trajectory"
            with tqdm(total=None, desc=f"{method} trajectories", unit="call", disable=not progress) as bar:
                def count(*_: Any, **__: Any) -> None:
                    bar.update(1)

                h = model.register_forward_pre_hook(count, with_kwargs=True)
                try:
                    data(model)
                finally:
                    h.remove()
            return
        if not isinstance(data, Iterable):
            raise FxditError(f"calib_inputs: expected an iterable of calls / call pairs or a callable, got "
                             f"{type(data).__name__}")
        seen = 0
        with tqdm(total=num_samples, desc=f"{method} calibration", unit="sample", disable=not progress) as bar:
            for i, item in enumerate(data):
                if seen >= num_samples:
                    break
                if method == "ca-svd":
                    if _is_pair(item):
                        raise FxditError(f"calib_inputs[{i}]: a call pair; ca-svd takes single calls (args, kwargs)")
                    args, kwargs = _check_call(item, f"calib_inputs[{i}]")
                    rec.mode = "magnitude"
                    model(*args, **kwargs)
                    n = _rows((args, kwargs))
                else:
                    if not _is_pair(item):
                        raise FxditError(f"calib_inputs[{i}]: cd-svd takes pairs of consecutive-step calls "
                                         "((args1, kwargs1), (args2, kwargs2)) or a run_trajectories callable")
                    first = _check_call(item[0], f"calib_inputs[{i}][0]")
                    second = _check_call(item[1], f"calib_inputs[{i}][1]")
                    rec.prev.clear()
                    rec.mode = "store"
                    model(*first[0], **first[1])
                    rec.mode = "delta"
                    model(*second[0], **second[1])
                    rec.prev.clear()
                    n = _rows(second)
                seen += n
                bar.update(min(n, max(0, num_samples - (seen - n))))
        if seen == 0:
            raise FxditError("calib_inputs is empty")


# ---------------------------------------------------------------------------------------------------------------
# Random diffusion-like calibration calls (for models without a sampler)
# ---------------------------------------------------------------------------------------------------------------


def _alphas_cumprod(train_steps: int) -> Tensor:
    betas = torch.linspace(1e-4, 0.02, train_steps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, 0)


def _locate(call: Call, where: int | str, what: str) -> Tensor:
    args, kwargs = call
    val = kwargs.get(where) if isinstance(where, str) else (args[where] if where < len(args) else None)
    if not isinstance(val, Tensor):
        raise FxditError(f"{what}={where!r}: the example call has no tensor there")
    return val


def _replace(call: Call, where: int | str, value: Tensor) -> Call:
    args, kwargs = list(call[0]), dict(call[1])
    if isinstance(where, str):
        kwargs[where] = value
    else:
        args[where] = value
    return tuple(args), kwargs


def diffusion_calls(example: Call, num_samples: int = 256, *, pairs: bool = False, latent: int | str = 0,
                    timestep: int | str | None = 1, steps: int = 50, train_steps: int = 1000,
                    x0: Tensor | None = None, seed: int = 0) -> Iterator[Any]:
    """Random noisy-latent calls shaped like ``example``, for CA-SVD (``pairs=False``) or CD-SVD (``pairs=True``).

    A stand-in for real data when a model has no sampler: clean latents ``x0`` (``None``: ``N(0, I)``, as no data
    is at hand) are noised with the DDPM linear-β schedule (``1e-4 … 0.02`` over ``train_steps``):
    ``x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε``, with ``t`` drawn per sample from ``steps`` evenly spaced timesteps (ICC
    calibrates on the 50-step grid). For pairs, the second call is at the previous (less noisy) grid timestep with
    the *same* ``x0`` and ``ε`` — the point a DDIM (η = 0) step with a perfect ε-prediction would reach — so no
    model-specific output convention is needed. The other arguments of ``example`` are reused as they are.

    Args:
        example: ``(args, kwargs)`` of one call.
        num_samples: total samples (batch rows) to produce.
        pairs: yield ``(call_t2, call_t1)`` pairs instead of single calls.
        latent: position or keyword of the noisy latent argument (batch first).
        timestep: position or keyword of the timestep argument (``None``: the model takes none); its dtype and
            shape (``[B]`` or scalar) are kept.
        steps: size of the timestep grid.
        train_steps: length of the noise schedule (timestep values lie in ``[0, train_steps)``).
        x0: optional clean latents ``[N, ...]`` (rows are used cyclically).
        seed: RNG seed.

    Yields:
        Calls ``(args, kwargs)`` or pairs of calls.
    """
    call = _check_call(example, "example")
    lat = _locate(call, latent, "latent")
    ts = _locate(call, timestep, "timestep") if timestep is not None else None
    if steps < 2 and pairs:
        raise FxditError(f"steps={steps}; pairs need at least 2 timesteps")
    g = torch.Generator().manual_seed(seed)
    abar = _alphas_cumprod(train_steps)
    grid = torch.linspace(0, train_steps - 1, steps, dtype=torch.float64).round().long()
    batch = lat.shape[0]
    made, row0 = 0, 0
    while made < num_samples:
        n = batch
        if x0 is None:
            clean = torch.randn(lat.shape, generator=g, dtype=torch.float32)
        else:
            idx = torch.arange(row0, row0 + n) % x0.shape[0]
            clean = x0[idx].float().cpu().reshape(lat.shape)
            row0 += n
        eps = torch.randn(lat.shape, generator=g, dtype=torch.float32)
        lo = 1 if pairs else 0
        if ts is not None and ts.dim() == 0:
            gi = torch.full((n,), int(torch.randint(lo, steps, (1,), generator=g)))
        else:
            gi = torch.randint(lo, steps, (n,), generator=g)

        def make(index: Tensor) -> Call:
            t = grid[index]
            a = abar[t].float().reshape(-1, *([1] * (lat.dim() - 1)))
            xt = (a.sqrt() * clean + (1 - a).sqrt() * eps).to(dtype=lat.dtype, device=lat.device)
            c = _replace(call, latent, xt)
            if ts is not None:
                tv = t[:1].reshape(()) if ts.dim() == 0 else t
                c = _replace(c, timestep, tv.to(dtype=ts.dtype, device=ts.device))
            return c

        yield (make(gi), make(gi - 1)) if pairs else make(gi)
        made += n


# ---------------------------------------------------------------------------------------------------------------
# calibrate
# ---------------------------------------------------------------------------------------------------------------


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        hint = did_you_mean(value, choices) if isinstance(value, str) else ""
        raise FxditError(f"{name}={value!r}; expected one of {', '.join(map(repr, choices))}{hint}")


def _peek(data: Any) -> tuple[Any, Any]:
    """``(first item, iterable that still yields it)`` for an iterable ``data``."""
    if isinstance(data, Sequence):
        return (data[0] if len(data) else None), data
    it = iter(data)
    try:
        first = next(it)
    except StopIteration:
        return None, ()
    return first, itertools.chain([first], it)


def calibrate(model: nn.Module, calib_inputs: CalibInputs = None, *, method: str = "svd", rank: int | None = 128,
              energy: float | None = None, qkv: str = "separate", example: Call | None = None,
              num_samples: int = 256, progress: bool = True, dtype: torch.dtype = torch.float32,
              modules: Mapping[str, str] | None = None, alpha: float = 0.5, max_ratio: float = 1000.0) -> Factors:
    """Low-rank factors for every cached linear layer of ``model`` (ICC calibration).

    The cached linears are found by :func:`fxdit.analysis.analyze` on one example call (roles ``q, k, v, qkv,
    attn_out, mlp_in, mlp_out``; modulation and other linears are never cached), or named with ``modules``.

    ``calib_inputs`` by method:

    * ``"svd"``: nothing; only ``example=(args, kwargs)`` (one call, to find the linears).
    * ``"ca-svd"``: an iterable of calls ``(args, kwargs)`` — e.g. noisy latents at random timesteps
      (:func:`diffusion_calls` makes such calls without data) — consumed until ``num_samples`` batch rows have
      run; or a callable ``run(model)`` whose every model call is recorded.
    * ``"cd-svd"``: an iterable of *pairs* of calls at two consecutive denoising steps
      ``((args_t2, kwargs_t2), (args_t1, kwargs_t1))`` (``diffusion_calls(..., pairs=True)``), consumed until
      ``num_samples`` rows; or a callable ``run_trajectories(model)`` that runs full sampling loops on ``model``:
      every call is recorded in order and differenced with the previous call of the same trajectory. A trajectory
      ends when the input shapes change or when the callable calls :func:`fxdit.calibration.new_trajectory`
      (call it before each sampling run). ``num_samples`` does not limit a callable.

    For ``ca-svd``/``cd-svd`` the example defaults to the first call of ``calib_inputs``; with a callable and no
    ``example``, the first call the callable makes is used.

    Args:
        model: the model, in eval mode (a ``torch.compile`` wrapper is unwrapped).
        calib_inputs: calibration data, see above.
        method: ``"svd"``, ``"ca-svd"`` or ``"cd-svd"``.
        rank: rank of every factor pair (ICC: 128), or the cap when ``energy`` is given; ``None`` with
            ``energy`` for a pure energy budget. A rank ≥ min(out, in) gives exact factors.
        energy: per-layer energy budget: the smallest rank keeping this share of ``Σσ²`` of the (weighted)
            weight.
        qkv: fused qkv weights: ``"separate"`` (keys ``path:q``, ``path:k``, ``path:v``, as ICC) or ``"joint"``.
        example: one call ``(args, kwargs)`` used to find the linears.
        num_samples: batch rows of calibration data to use (ICC: 256).
        progress: show tqdm progress bars.
        dtype: SVD dtype (``torch.float32`` or ``torch.float64``); factors are stored in it.
        modules: explicit ``{module path: role}`` instead of graph analysis.
        alpha: exponent of the channel weights (ICC: 0.5).
        max_ratio: channel weights are floored at ``max/max_ratio`` (ICC: 1000).

    Returns:
        :class:`Factors` with a fingerprint of the cached weights.

    Raises:
        FxditError: bad arguments or calibration data, or a model without cacheable linears.

    Example::

        spec = fxdit.apps.models.build("dit-tiny", batch=4)
        calls = fxdit.calibration.diffusion_calls((spec.args, spec.kwargs), 256, pairs=True)
        factors = fxdit.calibrate(spec.model, calls, method="cd-svd", rank=32)
        factors.save("dit_tiny_cd32.safetensors")
    """
    from tqdm.auto import tqdm

    _check_choice("method", method, METHODS)
    _check_choice("qkv", qkv, QKV_FACTORISATIONS)
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise FxditError(f"num_samples={num_samples!r}; expected an integer >= 1")
    if energy is not None and not (isinstance(energy, (int, float)) and 0.0 < float(energy) <= 1.0):
        raise FxditError(f"energy={energy!r}; expected a number in (0, 1]")
    if rank is None and energy is None:
        raise FxditError("rank=None and energy=None; give a rank (e.g. 128) or an energy budget (e.g. 0.99)")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise FxditError(f"rank={rank!r}; expected an integer >= 1")
    if dtype not in _SVD_DTYPES:
        raise FxditError(f"dtype={dtype}; expected torch.float32 or torch.float64")
    if not (isinstance(alpha, (int, float)) and alpha > 0):
        raise FxditError(f"alpha={alpha!r}; expected a positive number")
    if not (isinstance(max_ratio, (int, float)) and max_ratio >= 1):
        raise FxditError(f"max_ratio={max_ratio!r}; expected a number >= 1")
    if not isinstance(model, nn.Module):
        raise FxditError(f"model: expected an nn.Module, got {type(model).__name__}")
    base = _unwrap(model)
    if base.training:
        log.warning("calibrate: the model is in training mode; calibrating as is (call model.eval() first)")
    if method == "svd" and calib_inputs is not None:
        log.info("calibrate: method='svd' uses no calibration data; calib_inputs only supplies the example call")

    data = calib_inputs
    if example is not None:
        example = _check_call(example, "example")
    elif modules is None and data is not None and not callable(data):
        first, data = _peek(data)
        if first is None:
            raise FxditError("calib_inputs is empty")
        example = _check_call(first[0] if _is_pair(first) else first, "calib_inputs[0]")

    # 1. which linears
    targets: list[Target] | None = None
    if modules is not None:
        if not isinstance(modules, Mapping) or not modules:
            raise FxditError("modules: expected a non-empty mapping {module path: role}")
        for path, role in modules.items():
            _check_choice(f"modules[{path!r}]", role, CACHE_ROLES)
        targets = _targets_from(base, [(p, r, -1) for p, r in modules.items()], qkv)
    elif example is not None:
        targets = find_targets(base, example, qkv=qkv)
    elif method == "svd":
        raise FxditError("method='svd' needs example=(args, kwargs): one model call to find the cached linears")

    # 2. channel weights
    weights: dict[str, tuple[Tensor | None, Tensor | None]] = {}
    if method != "svd":
        if data is None:
            raise FxditError(f"method={method!r} needs calib_inputs; e.g. "
                             f"fxdit.calibration.diffusion_calls(example, {num_samples}"
                             f"{', pairs=True' if method == 'cd-svd' else ''})")
        paths = [t.module for t in targets] if targets is not None else [
            name for name, m in base.named_modules() if isinstance(m, nn.Linear)]
        captured: list[Call] = []
        if targets is None:
            # a callable without example: record every linear, take the first call as the example
            def grab(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                if not captured:
                    captured.append((tuple(args), dict(kwargs)))

            h = base.register_forward_pre_hook(grab, with_kwargs=True)
            try:
                weights = channel_weights(base, paths, data, method=method, num_samples=num_samples, alpha=alpha,
                                          max_ratio=max_ratio, progress=progress)
            finally:
                h.remove()
            if not captured:
                raise FxditError("calib_inputs made no model call")
            targets = find_targets(base, captured[0], qkv=qkv)
        else:
            weights = channel_weights(base, paths, data, method=method, num_samples=num_samples, alpha=alpha,
                                      max_ratio=max_ratio, progress=progress)
    assert targets is not None

    # 3. factorise
    factors: dict[str, tuple[Tensor, Tensor]] = {}
    exact: list[str] = []
    info: dict[str, dict[str, Any]] = {}
    cached_weights: dict[str, Tensor] = {}
    for t in tqdm(targets, desc=f"{method} factorisation", unit="linear", disable=not progress):
        W = _weight_of(base, t.module)
        cached_weights[t.module] = W
        left, right = weights.get(t.module, (None, None))
        if method != "svd" and left is None and right is None:
            log.warning("calibrate: %s never ran on the calibration data; plain SVD for it", t.module)
        if t.parts:
            n = W.shape[0] // 3
            chunks = [(p, W[i * n:(i + 1) * n], None if left is None else left[i * n:(i + 1) * n])
                      for i, p in enumerate(t.parts)]
        else:
            chunks = [(None, W, left)]
        for part, Wp, lp in chunks:
            key = t.module if part is None else f"{t.module}:{part}"
            lr = _factorize(Wp, lp, right, rank, energy=energy, dtype=dtype)
            factors[key] = (lr.A.cpu(), lr.B.cpu())
            if lr.exact:
                exact.append(key)
            info[key] = {"module": t.module, "part": part, "role": t.role, "block": t.block,
                         "energy": lr.energy, "pca_energy": lr.pca_energy}
            log.debug("calibrate: %s rank %d energy %.4f pca-energy %.4f%s", key, lr.rank, lr.energy,
                      lr.pca_energy, " (exact)" if lr.exact else "")
    meta = {"rank": rank, "energy": energy, "qkv": qkv, "num_samples": num_samples, "alpha": alpha,
            "max_ratio": max_ratio, "dtype": str(dtype).replace("torch.", ""), "model": type(base).__name__}
    result = Factors(factors, method=method, exact=exact, fingerprint=weight_fingerprint(cached_weights),
                     info=info, meta=meta)
    log.info("calibrate: %s", result)
    return result

