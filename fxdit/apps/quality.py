"""Quality metrics for the demo and ``fxdit eval``: fidelity to the full computation and sample quality.

Two kinds of numbers:

- **Fidelity** of an accelerated run to the full computation from the same noise: :func:`psnr` (fp64) and
  :func:`ssim` (torchmetrics), with the default gates of :data:`DEFAULT_GATES` (PSNR > 25 dB, SSIM > 0.90).
- **Sample quality** judged by :class:`DigitClassifier`, a small CNN trained on the same digits as the demo
  model (shipped in ``fxdit/apps/data/classifier``): :func:`class_accuracy`, an Inception-Score-like score
  (torchmetrics ``InceptionScore`` over the classifier's logits) and a Fréchet distance in the
  classifier's feature space against real digits (torchmetrics ``FrechetInceptionDistance`` with the
  classifier as the feature extractor). These are meaningful for the demo model only; for other models
  ``fxdit eval`` reports fidelity alone.

Images are float tensors ``(N, C, H, W)`` in ``[-1, 1]`` (the models' pixel range) unless said otherwise.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fxdit.errors import FxditError

__all__ = [
    "DEFAULT_GATES",
    "CLASSIFIER_DIR",
    "DigitClassifier",
    "Gates",
    "SampleScorer",
    "class_accuracy",
    "load_classifier",
    "psnr",
    "ssim",
]

log = logging.getLogger(__name__)

#: Where the shipped classifier lives (package data).
CLASSIFIER_DIR = Path(__file__).parent / "data" / "classifier"

#: Pixel range of model samples ([-1, 1]).
DATA_RANGE = 2.0


@dataclass(frozen=True)
class Gates:
    """Pass/fail thresholds of a mode against the full computation from the same noise.

    Args:
        psnr_db: the PSNR (dB) a mode must exceed.
        ssim: the SSIM a mode must exceed.
    """

    psnr_db: float = 25.0
    ssim: float = 0.90

    def passed(self, psnr_db: float, ssim_value: float) -> bool:
        """Whether both metrics clear their gates."""
        return psnr_db > self.psnr_db and ssim_value > self.ssim


DEFAULT_GATES = Gates()


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise FxditError(f"images: shapes {tuple(a.shape)} and {tuple(b.shape)} differ; expected equal shapes")
    if a.dim() != 4:
        raise FxditError(f"images: shape {tuple(a.shape)}; expected (N, C, H, W)")


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = DATA_RANGE) -> float:
    """Peak signal-to-noise ratio in dB over the whole batch (``inf`` for identical inputs).

    Args:
        a: images ``(N, C, H, W)``.
        b: reference images, same shape.
        data_range: the value range of the pixels (2 for [-1, 1]).
    """
    _check_pair(a, b)
    # Computed here in fp64 (torchmetrics' PSNR takes log10 of the range in fp32, ~1e-6 dB off).
    mse = float((a.detach().double() - b.detach().double()).pow(2).mean())
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range * data_range / mse)


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = DATA_RANGE) -> float:
    """Mean structural similarity (torchmetrics, Gaussian window 11, σ 1.5); 1 for identical inputs.

    Images smaller than 11×11 use the largest odd window that fits.

    Args:
        a: images ``(N, C, H, W)``, at least 3×3.
        b: reference images, same shape.
        data_range: the value range of the pixels (2 for [-1, 1]).
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    _check_pair(a, b)
    side = min(a.shape[-2:])
    kernel = min(11, side if side % 2 else side - 1)
    if kernel < 3:
        raise FxditError(f"images: {tuple(a.shape[-2:])} pixels; SSIM needs at least 3x3")
    return float(structural_similarity_index_measure(a.detach().double(), b.detach().double(),
                                                     data_range=data_range, kernel_size=kernel))


class DigitClassifier(nn.Module):
    """A small CNN for 1×32×32 digits in [-1, 1]: three stride-2 convs, global pooling, a feature layer.

    ``features(x)`` gives the ``feature_dim``-wide penultimate activations (used for the Fréchet distance),
    ``forward(x)`` the 10 class logits.
    """

    def __init__(self, num_classes: int = 10, width: int = 16, feature_dim: int = 32) -> None:
        super().__init__()
        self.config = {"num_classes": num_classes, "width": width, "feature_dim": feature_dim}
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(1, w, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(4 * w, feature_dim), nn.SiLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``(N, feature_dim)``."""
        if x.shape[-2:] != (32, 32):
            x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class _Features(nn.Module):
    """The classifier's feature layer as a torchmetrics feature extractor (``num_features`` attribute)."""

    def __init__(self, clf: DigitClassifier) -> None:
        super().__init__()
        self.clf = clf
        self.num_features = clf.config["feature_dim"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.clf.features(x.float())


class _Logits(nn.Module):
    def __init__(self, clf: DigitClassifier) -> None:
        super().__init__()
        self.clf = clf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.clf(x.float())


def load_classifier(path: str | Path | None = None) -> DigitClassifier:
    """Load the shipped digit classifier (or one saved by ``tools/train_classifier.py`` at ``path``).

    Raises:
        FxditError: when the folder lacks ``config.json`` or ``model.safetensors``.
    """
    from safetensors.torch import load_file

    folder = Path(path) if path is not None else CLASSIFIER_DIR
    cfg_file, weights = folder / "config.json", folder / "model.safetensors"
    if not cfg_file.is_file() or not weights.is_file():
        raise FxditError(f"classifier: {folder} lacks config.json/model.safetensors; expected a folder written by "
                         "tools/train_classifier.py")
    cfg = json.loads(cfg_file.read_text())
    clf = DigitClassifier(**{k: cfg[k] for k in ("num_classes", "width", "feature_dim")})
    clf.load_state_dict(load_file(str(weights)))
    return clf.eval().requires_grad_(False)


def class_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose arg-max logit is the label."""
    return float((logits.argmax(dim=1) == labels).double().mean())


class SampleScorer:
    """Scores sample batches with the digit classifier against a fixed set of real digits.

    The real-digit features are computed once; each :meth:`score` call gives class accuracy, the
    Inception-Score-like score and the Fréchet distance for one batch of samples.

    Args:
        classifier: the classifier (default: the shipped one).
        real: real digits ``(N, 1, 32, 32)`` in [-1, 1] (default: all of sklearn's digits, upsampled).
    """

    def __init__(self, classifier: DigitClassifier | None = None, real: torch.Tensor | None = None) -> None:
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.classifier = classifier if classifier is not None else load_classifier()
        if real is None:
            real, _ = digits_dataset()
        self.fid = FrechetInceptionDistance(feature=_Features(self.classifier), reset_real_features=False,
                                            normalize=True)
        with torch.no_grad():
            self.fid.update(real, real=True)

    @torch.no_grad()
    def score(self, samples: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """``{"class_accuracy", "is_score", "fd"}`` for ``samples`` (N ≥ 2) generated for ``labels``."""
        from torchmetrics.image.inception import InceptionScore

        logits = self.classifier(samples.float())
        with warnings.catch_warnings():  # the feature-buffer note and the std of a single split
            warnings.simplefilter("ignore", UserWarning)
            # normalize=False: the images reach the classifier as they are (True would cast them to uint8).
            inc = InceptionScore(feature=_Logits(self.classifier), splits=1, normalize=False)
            inc.update(samples.float())
            is_mean, _ = inc.compute()
        self.fid.reset()
        self.fid.update(samples.float(), real=False)
        return {"class_accuracy": class_accuracy(logits, labels), "is_score": float(is_mean),
                "fd": float(self.fid.compute())}


def digits_dataset(size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's ``load_digits`` as ``(1797, 1, size, size)`` float32 in [-1, 1] and int64 labels.

    The 8×8 images (values 0–16) are scaled to [-1, 1] and upsampled bilinearly, exactly as the demo model
    was trained.
    """
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32)) / 16.0 * 2.0 - 1.0
    x = x[:, None]
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(-1.0, 1.0)
    return x.contiguous(), torch.from_numpy(digits.target.astype(np.int64))


def describe(metrics: dict[str, Any]) -> str:
    """One-line human summary of a metrics dict (for logs)."""
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
