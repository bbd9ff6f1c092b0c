"""fxdit.kernels.torch_private: the one place private torch APIs are imported, with the supported-range check."""

from __future__ import annotations

import logging

import pytest
import torch
from fxdit.kernels import torch_private as tp

from fxdit.errors import FxditError


@pytest.mark.parametrize("text, expected", [("2.13.0+cpu", (2, 13)), ("2.11.0", (2, 11)), ("3.0.0a0+git1", (3, 0))])
def test_torch_version(text, expected):
    assert tp.torch_version(text) == expected


def test_torch_version_rejects_garbage():
    with pytest.raises(FxditError, match="cannot read a torch version"):
        tp.torch_version("nightly")


def test_supported_range_bounds():
    assert tp.in_supported_range((2, 11)) and tp.in_supported_range((2, 15))
    assert not tp.in_supported_range((2, 10)) and not tp.in_supported_range((2, 16))
    assert tp.in_supported_range(tp.torch_version())  # the suite runs on a supported torch


def test_missing_private_api_names_it_and_the_torch_version():
    with pytest.raises(FxditError) as err:
        tp.private_api("torch._inductor.compile_fx", "no_such_function_fxdit")
    text = str(err.value)
    assert "torch._inductor.compile_fx.no_such_function_fxdit" in text and torch.__version__ in text
    assert "2.11–2.15" in text
    with pytest.raises(FxditError, match="torch._no_such_module_fxdit.x"):
        tp.private_api("torch._no_such_module_fxdit", "x")


def test_warns_once_outside_the_supported_range(monkeypatch, caplog):
    tp._warn_outside_range.cache_clear()
    monkeypatch.setattr(torch, "__version__", "2.99.0")
    try:
        with caplog.at_level(logging.WARNING, logger=tp.__name__):
            tp.private_api("torch._guards", "detect_fake_mode")
            tp.private_api("torch._guards", "detect_fake_mode")
        warned = [r for r in caplog.records if "torch._guards.detect_fake_mode" in r.getMessage()]
        assert len(warned) == 1 and "2.99.0" in warned[0].getMessage()
    finally:
        tp._warn_outside_range.cache_clear()


def test_helpers_resolve_on_this_torch():
    flex = tp.flex_internals()
    assert callable(flex.hop) and callable(flex.apply_kernel_options) and callable(flex.identity)
    fake_tensor, fake_mode = tp.fake_tensor_types()
    with fake_mode() as mode:
        assert isinstance(torch.empty(2), fake_tensor)
    assert tp.detect_fake_mode([mode.from_tensor(torch.empty(1))]) is mode
    assert tp.detect_fake_mode([torch.empty(1)]) is None
    assert callable(tp.inductor_compile_fx()) and len(tp.inductor_decomposition_table()) > 100
    assert "fxdit" in tp.counters() or isinstance(tp.counters(), dict)
    assert tp.dynamo_passthrough_error() is not None
    assert isinstance(tp.cpu_flex_supported(), bool)


def test_no_private_torch_import_outside_the_helper():
    """Library modules reach private torch names only through torch_private (counters, fake tensors, inductor)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    needles = ("torch._guards", "torch._subclasses", "torch._inductor", "torch._higher_order_ops",
               "torch._dynamo.utils", "torch._dynamo.exc", "flex_attention import _")
    files = [*root.joinpath("fxdit").rglob("*.py"), *root.joinpath("passes").glob("*.py"),
             *root.joinpath("kernels").glob("*.py")]
    found = [f"{p.relative_to(root)}:{i}: {line.strip()}" for p in files if p.name != "torch_private.py"
             for i, line in enumerate(p.read_text().splitlines(), 1)
             if any(n in line for n in needles) and not line.lstrip().startswith("#")
             and "torch_private" not in line and '"' not in line.split("import")[0][-3:]]
    assert not found, "\n".join(found)
