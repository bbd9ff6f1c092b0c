"""ICC calibration: weighted SVD, channel statistics, Factors files and fingerprints, calibrate()."""

import json

import pytest
import torch
from fxdit.kernels.reference import lowrank_increment_ref
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from fxdit import calibration as cal
from fxdit.calibration import Factors, calibrate, channel_weights, select_rank, weighted_svd
from fxdit.errors import FxditError


def _werr(W, A, B, left=None, right=None):
    """‖diag(l)(W − AB)diag(ρ)‖_F with ICC's +1e-6 shift on given weights."""
    E = (W - A @ B).double()
    if left is not None:
        E = (left.double() + 1e-6)[:, None] * E
    if right is not None:
        E = E * (right.double() + 1e-6)[None, :]
    return E.norm().item()


def _rand(out_f, in_f, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    left = torch.rand(out_f, generator=g, dtype=torch.float64) * 3 + 0.1
    right = torch.rand(in_f, generator=g, dtype=torch.float64) * 3 + 0.1
    return W, left, right


# -- weighted SVD ------------------------------------------------------------------------------------------------


def test_uniform_weights_equal_plain_svd():
    W, _, _ = _rand(12, 9)
    A0, B0 = weighted_svd(W, rank=4, dtype=torch.float64)
    A1, B1 = weighted_svd(W, torch.ones(12), torch.ones(9), rank=4, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(W)
    plain = U[:, :4] @ torch.diag(S[:4]) @ Vh[:4]
    torch.testing.assert_close(A0 @ B0, plain, rtol=0, atol=1e-12)
    torch.testing.assert_close(A1 @ B1, plain, rtol=0, atol=1e-10)
    torch.testing.assert_close(A0, U[:, :4] * S[:4])  # singular values folded into A (merge mode "u")


def test_weighted_svd_is_the_weighted_optimum():
    W, left, right = _rand(10, 8, seed=1)
    r = 3
    A, B = weighted_svd(W, left, right, rank=r, dtype=torch.float64)
    best = _werr(W, A, B, left, right)
    # the closed form: the weighted error equals the tail of the weighted spectrum (Eckart–Young)
    S = torch.linalg.svdvals((left + 1e-6)[:, None] * W * (right + 1e-6)[None, :])
    assert best == pytest.approx(S[r:].square().sum().sqrt().item(), rel=1e-9)
    # plain SVD and perturbed factors are worse in the weighted norm
    Ap, Bp = weighted_svd(W, rank=r, dtype=torch.float64)
    assert _werr(W, Ap, Bp, left, right) > best
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        dA = 1e-3 * torch.randn(A.shape, generator=g, dtype=torch.float64)
        dB = 1e-3 * torch.randn(B.shape, generator=g, dtype=torch.float64)
        assert _werr(W, A + dA, B + dB, left, right) > best


@given(out_f=st.integers(1, 9), in_f=st.integers(1, 9), seed=st.integers(0, 10_000), weighted=st.booleans())
def test_error_decreases_with_rank(out_f, in_f, seed, weighted):
    W, left, right = _rand(out_f, in_f, seed)
    if not weighted:
        left = right = None
    errs = []
    for r in range(1, min(out_f, in_f) + 1):
        A, B = weighted_svd(W, left, right, rank=r, dtype=torch.float64)
        assert A.shape == (out_f, r) and B.shape == (r, in_f)
        errs.append(_werr(W, A, B, left, right))
    scale = W.norm().item() * 10
    assert all(b <= a + 1e-9 * scale for a, b in zip(errs, errs[1:]))
    assert errs[-1] <= 1e-9 * scale  # full rank reconstructs W


@pytest.mark.parametrize("shape", [(6, 4), (4, 6), (5, 5)])
def test_full_rank_is_exact(shape):
    W = torch.randn(*shape)
    for rank in (min(shape), min(shape) + 3):
        lr = cal._factorize(W, torch.rand(shape[0]), torch.rand(shape[1]), rank)
        assert lr.exact and lr.rank == min(shape)
        assert torch.equal(lr.A @ lr.B, W)  # bit for bit: one factor is the identity


@given(lead=st.integers(1, 4), k=st.integers(1, 8), n=st.integers(1, 8), seed=st.integers(0, 1000))
def test_full_rank_increment_equals_linear(lead, k, n, seed):
    """Full-rank (exact) factors make the cached step equal to running the linear."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n).double()
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g, dtype=torch.float64))
    x_c, x = (torch.randn(lead, k, generator=g, dtype=torch.float64) for _ in range(2))
    A, B = weighted_svd(lin.weight, rank=min(k, n), dtype=torch.float64)
    with torch.no_grad():
        y = lowrank_increment_ref(x, x_c, lin(x_c), B, A)
        torch.testing.assert_close(y, lin(x), rtol=1e-12, atol=1e-12)


def test_energy_picks_documented_rank():
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    s = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.25, 0.125], dtype=torch.float64)
    W = U[:, :6] @ torch.diag(s) @ V.t()
    share = torch.cumsum(s**2, 0) / (s**2).sum()  # 0.7502, 0.9377, 0.9846, 0.9963, 0.9993, 1
    for energy, expect in [(0.5, 1), (0.75, 1), (0.76, 2), (0.93, 2), (0.94, 3), (0.98, 3), (0.99, 4), (0.999, 5)]:
        assert int((share < energy).sum()) + 1 == expect  # the documented rule
        assert select_rank(s, energy) == expect
        A, B = weighted_svd(W, energy=energy, dtype=torch.float64)
        assert B.shape[0] == expect
        A, B = weighted_svd(W, rank=2, energy=energy, dtype=torch.float64)  # rank caps the budget
        assert B.shape[0] == min(2, expect)
    assert select_rank(s, 1.0) == 6
    with pytest.raises(FxditError):
        select_rank(s, 1.5)


@pytest.mark.parametrize("kwargs", [{"rank": 0}, {"rank": None}, {"rank": 2, "dtype": torch.float16},
                                    {"rank": 2, "left": torch.ones(3)}, {"rank": 2, "right": -torch.ones(4)}])
def test_weighted_svd_rejects_bad_arguments(kwargs):
    with pytest.raises(FxditError):
        weighted_svd(torch.randn(5, 4), **kwargs)


# -- channel statistics ------------------------------------------------------------------------------------------


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)

    def forward(self, x):
        return self.lin(x)


def _hand_weights(zs, alpha=0.5, ratio=1000.0):
    """ICC's formula written out with loops: per call, per sample min-max over channels, mean over batch."""
    acc = None
    for z in zs:
        mus = []
        for b in range(z.shape[0]):
            m = [z[b, :, c].abs().mean().item() for c in range(z.shape[-1])]
            lo, hi = min(m), max(m)
            mus.append([(v - lo + 1e-6) / (hi - lo + 1e-6) for v in m])
        mu = [sum(col) / len(mus) for col in zip(*mus)]
        acc = mu if acc is None else [a + b for a, b in zip(acc, mu)]
    w = [(a / len(zs)) ** alpha for a in acc]
    top = max(w)
    return torch.tensor([max(v, top / ratio) for v in w], dtype=torch.float64)


def _calls(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [((torch.randn(2, 5, 3, generator=g) * torch.tensor([1.0, 3.0, 0.1]),), {}) for _ in range(n)]


def test_ca_statistics_match_hand_computation():
    model = _Tiny().eval()
    calls = _calls(3)
    (left, right), = channel_weights(model, ["lin"], calls, method="ca-svd").values()
    with torch.no_grad():
        ys = [model(*a) for a, _ in calls]
    torch.testing.assert_close(right, _hand_weights([a[0] for a, _ in calls]))
    torch.testing.assert_close(left, _hand_weights(ys))


def test_cd_statistics_pairs_and_trajectories_match_hand_computation():
    model = _Tiny().eval()
    calls = _calls(5, seed=1)
    xs = [a[0] for a, _ in calls]
    with torch.no_grad():
        ys = [model(x) for x in xs]
    # pairs (c0, c1), (c2, c3)
    pairs = [(calls[0], calls[1]), (calls[2], calls[3])]
    (left, right), = channel_weights(model, ["lin"], pairs, method="cd-svd").values()
    torch.testing.assert_close(right, _hand_weights([xs[1] - xs[0], xs[3] - xs[2]]))
    torch.testing.assert_close(left, _hand_weights([ys[1] - ys[0], ys[3] - ys[2]]))

    # trajectories: c0 c1 c2 | c3 c4 → differences (1-0), (2-1), (4-3)
    def run(m):
        for i, x in enumerate(xs):
            if i == 3:
                cal.new_trajectory()
            m(x)

    (left, right), = channel_weights(model, ["lin"], run, method="cd-svd").values()
    torch.testing.assert_close(right, _hand_weights([xs[1] - xs[0], xs[2] - xs[1], xs[4] - xs[3]]))
    torch.testing.assert_close(left, _hand_weights([ys[1] - ys[0], ys[2] - ys[1], ys[4] - ys[3]]), rtol=1e-5,
                               atol=1e-6)


def test_num_samples_limits_iterables():
    model = _Tiny().eval()
    seen = []
    model.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    channel_weights(model, ["lin"], iter(_calls(10)), method="ca-svd", num_samples=5)
    assert sum(seen) == 6  # three calls of batch 2 reach 5 samples


@pytest.mark.parametrize("method,data", [("ca-svd", lambda c: [(c[0], c[1])]), ("cd-svd", lambda c: c),
                                         ("cd-svd", lambda c: []), ("ca-svd", lambda c: [("x", {})])])
def test_channel_weights_reject_wrong_data(method, data):
    with pytest.raises(FxditError):
        channel_weights(_Tiny().eval(), ["lin"], data(_calls(2)), method=method)


# -- Factors files -----------------------------------------------------------------------------------------------


class _Block(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        x = x + self.proj(torch.softmax(q @ k.transpose(-1, -2), -1) @ v)
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(x)))


_MODULES = {"qkv": "qkv", "proj": "attn_out", "fc1": "mlp_in", "fc2": "mlp_out"}


def _factors(method="svd", rank=3, **kw):
    model = _Block().eval()
    data = None if method == "svd" else cal.diffusion_calls(((torch.randn(2, 6, 8),), {}), 8, timestep=None,
                                                              pairs=method == "cd-svd")
    return model, calibrate(model, data, method=method, rank=rank, modules=_MODULES, progress=False, **kw)


@pytest.mark.parametrize("method", ["svd", "ca-svd", "cd-svd"])
def test_calibrate_keys_ranks_and_round_trip(method, tmp_path):
    model, f = _factors(method)
    assert f.keys() == ["qkv:q", "qkv:k", "qkv:v", "proj", "fc1", "fc2"]
    assert f.method == method and set(f.ranks.values()) == {3} and not f.exact
    parts = f.factors_for("qkv")
    assert [p for p, _, _ in parts] == ["q", "k", "v"]
    assert f.factors_for("fc1")[0][0] is None and f.factors_for("nope") == []
    # each part approximates its row-third of the fused weight
    W = model.qkv.weight.detach()
    for i, (_, A, B) in enumerate(parts):
        assert A.shape == (8, 3) and B.shape == (3, 8)
        assert (A @ B - W[8 * i:8 * (i + 1)]).norm() < W[8 * i:8 * (i + 1)].norm()
    path = tmp_path / "f.safetensors"
    f.save(path)
    g = Factors.load(path)
    assert g.keys() == f.keys() and g.ranks == f.ranks and g.method == f.method and g.exact == f.exact
    assert g.fingerprint == f.fingerprint and g.info == f.info
    for key in f.keys():
        assert all(torch.equal(a, b) for a, b in zip(f.get(key), g.get(key)))
    g.verify_model(model)


def test_joint_qkv_energy_and_exact_keys():
    model, f = _factors(rank=100, qkv="joint")
    assert f.keys() == ["qkv", "proj", "fc1", "fc2"] and f.exact == set(f.keys())
    assert torch.equal(f.get("qkv")[0] @ f.get("qkv")[1], model.qkv.weight.detach())
    _, f = _factors(rank=None, energy=0.5)
    assert all(1 <= r < 8 for r in f.ranks.values())


def test_fused_lora_change_is_rejected():
    model, f = _factors()
    weights = {name: getattr(model, name).weight.detach() for name in _MODULES}
    f.verify(weights)
    delta = 1e-3 * torch.randn(24, 2) @ torch.randn(2, 8)  # a small fused LoRA update W + B·A
    with pytest.raises(FxditError, match="recalibrate"):
        f.verify({**weights, "qkv": weights["qkv"] + delta})
    with pytest.raises(FxditError, match="recalibrate"):
        f.verify({**weights, "fc1": torch.randn(16, 9)})  # another model
    with pytest.raises(FxditError, match="recalibrate"):
        f.verify({k: v for k, v in weights.items() if k != "fc2"})
    f.verify({k: v for k, v in weights.items() if k != "fc2"}, partial=True)


def test_fingerprint_across_dtypes():
    model, f = _factors()
    weights = {name: getattr(model, name).weight.detach() for name in _MODULES}
    f.verify({k: v.to(torch.bfloat16) for k, v in weights.items()})  # same weights, cast: accepted
    f.verify({k: v.half() for k, v in weights.items()})
    changed = {k: (v + 0.1 * v.norm() / v.numel() ** 0.5 * torch.randn_like(v)).to(torch.bfloat16)
               for k, v in weights.items()}  # a 10 % change survives bf16 rounding
    with pytest.raises(FxditError, match="recalibrate"):
        f.verify(changed)


def _corrupt(kind, path, good):
    data = good.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "garbage":
        path.write_bytes(b"\x00\x01not a safetensors file" * 10)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "foreign":
        from safetensors.torch import save_file

        save_file({"w": torch.zeros(2)}, str(path))
    elif kind in ("int_dtype", "bad_rank", "missing_tensor", "bad_json", "nan"):
        from safetensors import safe_open
        from safetensors.torch import save_file

        with safe_open(str(good), "pt") as fh:
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
            header = dict(fh.metadata())
        if kind == "int_dtype":
            tensors["proj.A"] = tensors["proj.A"].to(torch.int32)
        elif kind == "bad_rank":
            tensors["proj.B"] = tensors["proj.B"][:2]
        elif kind == "missing_tensor":
            del tensors["fc1.A"]
        elif kind == "nan":
            tensors["fc2.B"][0, 0] = float("nan")
        else:
            header["fxdit"] = header["fxdit"][:-5]
        save_file(tensors, str(path), metadata=header)


@pytest.mark.parametrize("kind", ["missing", "truncated", "garbage", "empty", "foreign", "int_dtype", "bad_rank",
                                  "missing_tensor", "bad_json", "nan", "directory"])
def test_bad_files_raise_fxdit_error(kind, tmp_path):
    _, f = _factors()
    good = tmp_path / "good.safetensors"
    f.save(good)
    bad = tmp_path / "bad.safetensors"
    if kind == "directory":
        bad.mkdir()
    elif kind != "missing":
        _corrupt(kind, bad, good)
    with pytest.raises(FxditError):
        Factors.load(bad)


def test_metadata_is_json_and_load_executes_nothing(tmp_path):
    _, f = _factors()
    path = tmp_path / "f.safetensors"
    f.save(path)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        meta = json.loads(fh.metadata()["fxdit"])
    assert meta["method"] == "svd" and meta["keys"] == f.keys()
    assert Factors.load(path, device="cpu").get("proj")[0].device.type == "cpu"


# -- calibrate() -------------------------------------------------------------------------------------------------


def test_diffusion_call_pairs_are_consecutive_steps():
    example = ((torch.zeros(3, 2, 4, 4), torch.zeros(3, dtype=torch.long)), {"y": torch.ones(3)})
    pairs = list(cal.diffusion_calls(example, 7, pairs=True, steps=10))
    assert len(pairs) == 3  # 3 rows per call, 7 samples
    grid = torch.linspace(0, 999, 10).round().long()
    for (a2, k2), (a1, k1) in pairs:
        t2, t1 = a2[1], a1[1]
        assert t2.dtype == torch.long and torch.equal(k2["y"], example[1]["y"])
        i2 = torch.searchsorted(grid, t2)
        assert torch.equal(grid[i2], t2) and torch.equal(grid[i2 - 1], t1)
        assert not torch.equal(a2[0], a1[0])


@pytest.mark.parametrize("kwargs", [{"method": "pca"}, {"method": "svd"}, {"method": "ca-svd"},
                                    {"method": "svd", "example": ((), {}), "qkv": "fused"},
                                    {"method": "svd", "example": ((), {}), "num_samples": 0},
                                    {"method": "svd", "example": ((), {}), "rank": None}])
def test_calibrate_rejects_bad_arguments(kwargs):
    with pytest.raises(FxditError):
        calibrate(_Block(), progress=False, **kwargs)


def test_calibrate_dit_tiny_with_analysis():
    """Graph analysis finds the cached linears of the reference DiT; factors cover exactly those."""
    from fxdit.apps import models

    spec = models.build("dit-tiny", batch=2)
    f = calibrate(spec.model, example=(spec.args, spec.kwargs), rank=4, progress=False)
    roles = {info["role"] for info in f.info.values()}
    assert roles <= {"qkv", "attn_out", "mlp_in", "mlp_out"} and "qkv" in roles
    assert all(mod.startswith("blocks.") for mod in f.modules())
    assert not any("adaLN" in mod for mod in f.modules())
    assert len(f.modules()) == 4 * spec.expected.blocks
    f.verify_model(spec.model)


def test_calibrate_cd_trajectories_on_dit_tiny():
    """A run_trajectories callable without example: the first call it makes is used for the analysis."""
    from fxdit.apps import models

    spec = models.build("dit-tiny", batch=2)
    x, t, *rest = spec.args

    def run(model):
        for traj in range(2):
            cal.new_trajectory()
            z = torch.randn_like(x)
            for step in range(3):
                z = z - 0.1 * model(z, torch.full_like(t, 900 - 300 * step), *rest, **spec.kwargs)[:, : z.shape[1]]

    f = calibrate(spec.model, run, method="cd-svd", rank=4, progress=False)
    assert f.method == "cd-svd" and len(f.modules()) == 4 * spec.expected.blocks


def test_cli_calibrate_writes_a_loadable_file(tmp_path):
    from fxdit.apps import models
    from fxdit.cli import main

    out = tmp_path / "f.safetensors"
    rc = main(["calibrate", "--model", "dit-tiny", "--method", "cd-svd", "--rank", "4", "--samples", "4",
               "--batch", "2", "--steps", "10", "--out", str(out), "--no-progress"])
    assert rc == 0
    f = Factors.load(out)
    assert f.method == "cd-svd" and set(f.ranks.values()) == {4}
    f.verify_model(models.build("dit-tiny", batch=2).model)  # same seed → same weights
    assert main(["calibrate", "--model", "dit-tiny", "--samples", "0", "--out", str(out)]) == 2
