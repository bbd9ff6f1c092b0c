"""Train the small digit classifier that judges demo samples (fxdit.apps.quality.DigitClassifier).

Data: sklearn ``load_digits`` scaled to [-1, 1] and upsampled to 32×32 as the demo model saw it; a seeded
80/20 split reports held-out accuracy, then the final model is trained on all images. Augmentation: random
shifts of up to 2 pixels (as the diffusion model's training). Adam, lr 3e-3, batch 64. Takes seconds.

Usage::

    python tools/train_classifier.py --out fxdit/apps/data/classifier
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_demo_model import random_shift  # noqa: E402

from fxdit.apps.quality import DigitClassifier, digits_dataset  # noqa: E402


def train(x: torch.Tensor, y: torch.Tensor, *, epochs: int, seed: int, lr: float, batch: int) -> DigitClassifier:
    """Train a fresh classifier on (x, y)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    clf = DigitClassifier()
    opt = torch.optim.Adam(clf.parameters(), lr=lr)
    steps_per_epoch = (len(x) + batch - 1) // batch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    clf.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch):
            idx = perm[i : i + batch]
            xb = random_shift(x[idx], 2, gen)
            loss = F.cross_entropy(clf(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return clf.eval()


def main(argv: list[str] | None = None) -> int:
    from safetensors.torch import save_file

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("fxdit/apps/data/classifier"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("settings:", json.dumps({k: str(v) for k, v in vars(args).items()}, sort_keys=True), flush=True)

    x, y = digits_dataset(32)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed))
    n_test = len(x) // 5
    test, tr = perm[:n_test], perm[n_test:]
    t0 = time.monotonic()
    clf = train(x[tr], y[tr], epochs=args.epochs, seed=args.seed, lr=args.lr, batch=args.batch)
    with torch.no_grad():
        held_out = float((clf(x[test]).argmax(1) == y[test]).double().mean())
    print(f"held-out accuracy (80/20 split): {held_out:.4f} ({time.monotonic() - t0:.1f} s)", flush=True)

    clf = train(x, y, epochs=args.epochs, seed=args.seed, lr=args.lr, batch=args.batch)
    with torch.no_grad():
        train_acc = float((clf(x).argmax(1) == y).double().mean())
    args.out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in clf.state_dict().items()}, str(args.out / "model.safetensors"))
    info = dict(clf.config, held_out_accuracy=held_out, train_accuracy=train_acc, seed=args.seed,
                epochs=args.epochs, lr=args.lr, batch=args.batch)
    (args.out / "config.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    print(f"saved to {args.out}: train accuracy {train_acc:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
