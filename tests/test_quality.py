"""Quality metrics: PSNR/SSIM against closed forms, gates, the shipped digit classifier and its scores."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fxdit.apps.quality import (
    DATA_RANGE,
    DEFAULT_GATES,
    Gates,
    SampleScorer,
    class_accuracy,
    digits_dataset,
    load_classifier,
    psnr,
    ssim,
)
from fxdit.errors import FxditError


def _images(seed: int = 0, n: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, 1, 32, 32), generator=g) * 1.6 - 0.8


def test_identical_inputs_give_inf_psnr_and_unit_ssim():
    x = _images()
    assert psnr(x, x.clone()) == math.inf
    assert ssim(x, x.clone()) == pytest.approx(1.0, abs=1e-12)


@given(delta=st.floats(min_value=1e-3, max_value=0.15))
def test_psnr_of_a_constant_offset_matches_closed_form(delta):
    x = _images().double()  # fp64 so that x + delta carries the offset exactly enough for 1e-6 dB
    expected = 10 * math.log10(DATA_RANGE**2 / delta**2)
    assert psnr(x + delta, x) == pytest.approx(expected, abs=1e-6)


def test_psnr_of_known_noise_level():
    x = _images()
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)) * 0.05
    mse = float((noise.double() ** 2).mean())
    assert psnr(x + noise, x) == pytest.approx(10 * math.log10(4.0 / mse), abs=1e-6)


@given(m1=st.floats(min_value=-0.9, max_value=0.9), m2=st.floats(min_value=-0.9, max_value=0.9))
def test_ssim_of_constant_images_matches_closed_form(m1, m2):
    # Zero variance: SSIM reduces to the luminance term (2 m1 m2 + C1) / (m1² + m2² + C1), C1 = (0.01 L)².
    a = torch.full((2, 1, 16, 16), m1, dtype=torch.float64)
    b = torch.full((2, 1, 16, 16), m2, dtype=torch.float64)
    c1 = (0.01 * DATA_RANGE) ** 2
    assert ssim(a, b) == pytest.approx((2 * m1 * m2 + c1) / (m1 * m1 + m2 * m2 + c1), abs=1e-9)


def test_ssim_drops_with_noise_and_is_symmetric():
    x = _images()
    small = x + 0.02 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    large = x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    assert 1.0 > ssim(small, x) > ssim(large, x)
    assert ssim(small, x) == pytest.approx(ssim(x, small), abs=1e-12)


def test_metrics_reject_mismatched_shapes():
    with pytest.raises(FxditError, match="shapes"):
        psnr(_images(n=2), _images(n=3))
    with pytest.raises(FxditError, match=r"\(N, C, H, W\)"):
        ssim(torch.zeros(3, 32, 32), torch.zeros(3, 32, 32))


def test_gates():
    assert DEFAULT_GATES == Gates(25.0, 0.90)
    assert DEFAULT_GATES.passed(25.1, 0.91)
    assert not DEFAULT_GATES.passed(25.0, 0.99)
    assert not DEFAULT_GATES.passed(math.inf, 0.90)
    assert DEFAULT_GATES.passed(math.inf, 1.0)


def test_class_accuracy():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, -1.0], [0.0, 1.0]])
    assert class_accuracy(logits, torch.tensor([0, 1, 1, 0])) == 0.5


def test_shipped_classifier_recognises_real_digits():
    clf = load_classifier()
    x, y = digits_dataset()
    with torch.no_grad():
        acc = class_accuracy(clf(x), y)
        feats = clf.features(x[:4])
    assert acc > 0.95
    assert feats.shape == (4, clf.config["feature_dim"])


def test_load_classifier_names_the_missing_folder(tmp_path):
    with pytest.raises(FxditError, match=str(tmp_path)):
        load_classifier(tmp_path)


def test_scorer_separates_real_digits_from_noise():
    x, y = digits_dataset()
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(x), generator=g)
    scorer = SampleScorer(real=x[idx[:600]])
    real = scorer.score(x[idx[600:700]], y[idx[600:700]])
    noise = scorer.score(torch.rand((100, 1, 32, 32), generator=g) * 2 - 1, y[idx[600:700]])
    assert real["class_accuracy"] > 0.9
    assert noise["class_accuracy"] < 0.5
    assert real["fd"] < noise["fd"]
    assert real["is_score"] > noise["is_score"]
    assert 1.0 <= real["is_score"] <= 10.0
