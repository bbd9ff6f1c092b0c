"""Test set-up: Triton's interpreter on CPU, seeds, fresh Dynamo state, hypothesis profiles."""

import os

# Must be set before any Triton kernel module is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci", deadline=None, derandomize=True, max_examples=25,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "slow", deadline=None, max_examples=200,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("FXDIT_HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _pass_errors_raise(monkeypatch):
    """Tests compile with ``on_pass_error="raise"`` unless their options say otherwise: with the user default
    (``"fallback"``) a bug in a pass would only drop the pass with a warning and the test could still pass. Tests of
    the fallback itself set ``"fallback"`` explicitly. A typed ``FxditConfig`` given directly keeps its own value."""
    from collections.abc import Mapping

    from fxdit.config import FxditConfig

    original = FxditConfig.from_mapping.__func__

    def from_mapping(cls, options):
        if options is None:
            options = {}
        if isinstance(options, Mapping) and "on_pass_error" not in options:
            options = {**options, "on_pass_error": "raise"}
        return original(cls, options)

    monkeypatch.setattr(FxditConfig, "from_mapping", classmethod(from_mapping))


@pytest.fixture(autouse=True)
def _fresh_state():
    """Seed, a clean Dynamo cache and clean fxdit counters/registry for every test."""
    from fxdit import registry

    torch.manual_seed(0)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    registry.clear()
    yield
    torch._dynamo.reset()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def no_inductor(monkeypatch):
    """The real backend (pipeline, dump, registry, runtime) with inductor left out: the rewritten graph runs as
    Python. For tests of the passes' semantics that cannot afford a C++ compile per case."""
    from fxdit import backend

    def lower(gm, example_inputs, cfg):
        consts = backend.lifted_constants(gm)
        return lambda *args: gm(*args, *consts)

    monkeypatch.setattr(backend, "lower", lower)
