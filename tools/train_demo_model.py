"""Train fxdit's shipped demo model: a class-conditional diffusers DiT on sklearn's 8x8 digits.

The model is a ``diffusers.DiTTransformer2DModel`` in pixel space: 1 channel, 32x32 (the 8x8 digits
upsampled bilinearly), patch 2 (256 tokens), 6 layers, 6 heads x 32 = 192 hidden, ``ada_norm_zero``,
epsilon prediction (``out_channels=1``, no learned sigma). ``num_embeds_ada_norm`` is diffusers' name for
the number of classes: 10, and the label embedding table has an 11th row (index 10) that is the null label
used by classifier-free guidance. Diffusers drops labels independently in every block when the model is in
train mode; this script turns that off and drops 10 % of the labels itself, once per sample, so every block
sees the same (possibly null) label.

Training: AdamW (lr 3e-4, linear warmup, constant, then a linear decay to 10 % over the last ``--decay-frac``
of ``--max-steps``), batch 32, 1000-step ``squaredcos_cap_v2`` DDPM noise schedule, MSE on epsilon, light
augmentation (random shifts of up to 1/16 of the image side), an EMA of the weights (that is what gets saved).
Progressive resolution: the first ``--low-res-steps`` steps run at ``--low-res`` pixels (16x16: 64 tokens, about
6x cheaper per step), the rest at 32x32. diffusers' ``PatchEmbed`` recomputes its sin-cos position table for
the smaller grid on the same coordinate range (``base_size``), so the weights carry over unchanged; the saved
model is the 32x32 one. It stops at ``--max-steps`` or when ``--time-budget-min`` runs out, whichever comes
first, and saves a checkpoint every ``--checkpoint-min`` minutes, so a usable model exists early. To reproduce a
shipped model bit for bit, pass the step count it reports as ``--max-steps`` with the same seed and thread count.

The weights are saved in fp16 (about 11 MB) with ``save_pretrained(safe_serialization=True)``; load them
with ``DiTTransformer2DModel.from_pretrained(path, torch_dtype=torch.float32)``. The folder also holds the
``DDIMScheduler`` config for sampling (``scheduler_config.json``) and ``training_info.json``.

Usage::

    python tools/train_demo_model.py --out fxdit/apps/data/demo_dit --time-budget-min 50
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # diffusers' LabelEmbedding uses index num_classes as the dropped label


def model_config() -> dict:
    """The DiTTransformer2DModel config of the demo model."""
    return dict(
        num_attention_heads=6,
        attention_head_dim=32,
        in_channels=1,
        out_channels=1,
        num_layers=6,
        sample_size=32,
        patch_size=2,
        norm_type="ada_norm_zero",
        num_embeds_ada_norm=NUM_CLASSES,
        activation_fn="gelu-approximate",
        norm_elementwise_affine=False,
    )


def scheduler_config() -> dict:
    """The noise schedule the model is trained with (and sampled with, through DDIMScheduler)."""
    return dict(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="epsilon",
        clip_sample=True,
        clip_sample_range=1.0,
        set_alpha_to_one=False,
        steps_offset=0,
        timestep_spacing="trailing",
    )


def load_digit_images(size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's load_digits as (N, 1, size, size) float32 in [-1, 1] and (N,) int64 labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32)) / 16.0 * 2.0 - 1.0
    x = x[:, None]
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(-1.0, 1.0)
    y = torch.from_numpy(digits.target.astype(np.int64))
    return x.contiguous(), y


def random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels in x and y, filling with background (-1)."""
    if max_shift <= 0:
        return x
    n, c, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    offs = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=gen)
    out = torch.empty_like(x)
    for i in range(n):
        dy, dx = int(offs[i, 0]), int(offs[i, 1])
        out[i] = padded[i, :, dy : dy + h, dx : dx + w]
    return out


def save_checkpoint(ema, out: Path, info: dict) -> None:
    """Save the EMA model in fp16 plus scheduler config and training info, replacing ``out`` atomically."""
    from diffusers import DDIMScheduler

    tmp = out.parent / (out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    half = copy.deepcopy(ema).to(torch.float16)
    half.save_pretrained(tmp, safe_serialization=True)
    DDIMScheduler(**scheduler_config()).save_pretrained(tmp)
    (tmp / "training_info.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    old = out.parent / (out.name + ".old")
    if out.exists():
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
    tmp.rename(out)
    if old.exists():
        shutil.rmtree(old)


def evaluate(folder: Path, per_class: int, steps: int, guidance: float) -> dict:
    """The quality bar: DDIM ``steps`` + CFG samples of every class, judged by the shipped digit classifier."""
    import fxdit.apps.sampler as sampling
    from fxdit.apps.quality import SampleScorer

    loaded = sampling.load_dit(folder)
    labels = sampling.class_labels(range(NUM_CLASSES), per_class)
    noise = sampling.initial_noise(len(labels), (1, 32, 32), seed=1234)
    den = sampling.Denoiser.for_model(loaded.transformer)
    t0 = time.monotonic()
    with torch.no_grad():
        images = sampling.ddim_sample(den, labels, noise, loaded.scheduler, steps=steps, guidance_scale=guidance,
                                      desc="quality check")
    scorer = SampleScorer()
    scores = scorer.score(images, labels)
    with torch.no_grad():
        hits = (scorer.classifier(images).argmax(1) == labels).view(NUM_CLASSES, per_class).double().mean(1)
    return dict(scores, per_class_accuracy=[round(float(v), 3) for v in hits], samples=len(labels), steps=steps,
                guidance_scale=guidance, noise_seed=1234, seconds=round(time.monotonic() - t0, 1))


def record_eval(out: Path, result: dict) -> None:
    """Keep a quality check in ``training_info.json`` under ``evals`` (one entry per guidance scale and step count,
    the latest run replacing an earlier one with the same settings)."""
    path = out / "training_info.json"
    if not path.is_file():
        return
    info = json.loads(path.read_text())
    key = f"cfg{result['guidance_scale']:g}_steps{result['steps']}"
    info.setdefault("evals", {})[key] = result
    path.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("fxdit/apps/data/demo_dit"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--label-dropout", type=float, default=0.1)
    p.add_argument("--max-shift", type=int, default=2, help="random shift in pixels at 32x32 (scaled at --low-res)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="total steps (default: run until --time-budget-min; the lr decay then follows the clock)")
    p.add_argument("--low-res", type=int, default=16, help="pixel size of the first training phase")
    p.add_argument("--low-res-steps", type=int, default=None,
                   help="steps at --low-res (default: the first --low-res-frac of the time budget)")
    p.add_argument("--low-res-frac", type=float, default=0.6)
    p.add_argument("--decay-frac", type=float, default=0.3,
                   help="final fraction of the run (steps, or time without --max-steps) over which the lr decays "
                        "linearly to 10%%")
    p.add_argument("--time-budget-min", type=float, default=50.0)
    p.add_argument("--checkpoint-min", type=float, default=5.0)
    p.add_argument("--eval-per-class", type=int, default=10,
                   help="after training: samples per class for the quality check (0: skip)")
    p.add_argument("--eval-steps", type=int, default=50)
    p.add_argument("--eval-guidance", type=float, default=1.5)
    p.add_argument("--eval-only", action="store_true", help="only run the quality check on --out")
    args = p.parse_args(argv)
    if args.eval_only:
        torch.set_num_threads(args.threads)
        result = evaluate(args.out, args.eval_per_class, args.eval_steps, args.eval_guidance)
        record_eval(args.out, result)
        print(json.dumps(result, indent=2))
        return 0

    from diffusers import DDPMScheduler, DiTTransformer2DModel
    from tqdm import tqdm

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings.update(model=model_config(), scheduler=scheduler_config(), torch=torch.__version__)
    print("settings:", json.dumps(settings, sort_keys=True), flush=True)

    x_all, y_all = load_digit_images(32)
    x_low = load_digit_images(args.low_res)[0] if args.low_res_steps != 0 and args.low_res_frac > 0 else None
    model = DiTTransformer2DModel(**model_config())
    # Label dropout is done here, once per sample; switch off diffusers' per-block dropout.
    for mod in model.modules():
        if type(mod).__name__ == "LabelEmbedding":
            mod.dropout_prob = 0.0
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M params, data: {tuple(x_all.shape)}", flush=True)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    noise_sched = DDPMScheduler(**{k: v for k, v in scheduler_config().items() if k != "set_alpha_to_one"})
    alphas_cumprod = noise_sched.alphas_cumprod.float()

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    budget = args.time_budget_min * 60.0
    start = time.monotonic()

    def progress(s: int) -> float:
        """Fraction of the run done: by steps when --max-steps is given, else by the clock."""
        if args.max_steps is not None:
            return s / args.max_steps
        return (time.monotonic() - start) / budget

    def lr_factor(s: int) -> float:
        warm = min(1.0, (s + 1) / max(1, args.warmup))
        f = progress(s)
        if f < 1.0 - args.decay_frac:
            return warm
        return warm * max(0.1, 1.0 - 0.9 * (f - (1.0 - args.decay_frac)) / args.decay_frac)

    def low_res_phase(s: int) -> bool:
        if args.low_res_steps is not None:
            return s < args.low_res_steps
        return progress(s) < args.low_res_frac

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    switch_step = None

    last_ckpt = start
    n = x_all.shape[0]
    perm = torch.randperm(n, generator=gen)
    cursor = 0
    loss_avg = None
    step = 0
    model.train()
    max_steps = args.max_steps if args.max_steps is not None else 10**9
    bar = tqdm(total=args.max_steps, desc="train demo DiT", mininterval=30.0, file=sys.stdout)
    while step < max_steps and time.monotonic() - start < budget:
        if cursor + args.batch > n:
            perm = torch.randperm(n, generator=gen)
            cursor = 0
        idx = perm[cursor : cursor + args.batch]
        cursor += args.batch
        low = x_low is not None and low_res_phase(step)
        if not low and switch_step is None:
            switch_step = step
            print(f"step {step}: switching to 32x32 (to reproduce: --low-res-steps {step})", flush=True)
        x0 = (random_shift(x_low[idx], max(1, args.max_shift * args.low_res // 32), gen) if low
              else random_shift(x_all[idx], args.max_shift, gen))
        y = y_all[idx].clone()
        drop = torch.rand(y.shape[0], generator=gen) < args.label_dropout
        y[drop] = NULL_CLASS
        t = torch.randint(0, 1000, (y.shape[0],), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        pred = model(xt, timestep=t, class_labels=y).sample
        loss = F.mse_loss(pred, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm.detach(), 1.0 - decay)
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        bar.update(1)
        if step % 50 == 0:
            el = time.monotonic() - start
            print(f"step {step} {'low-res' if low else '32x32'} loss {loss_avg:.4f} lr {sched.get_last_lr()[0]:.2e} "
                  f"elapsed {el / 60:.1f} min ({el / step:.2f} s/step)", flush=True)
        if time.monotonic() - last_ckpt > args.checkpoint_min * 60.0:
            info = dict(settings, steps=step, low_res_steps_done=switch_step, loss_ema=loss_avg,
                        elapsed_s=time.monotonic() - start, final=False)
            save_checkpoint(ema, args.out, info)
            last_ckpt = time.monotonic()
            print(f"checkpoint at step {step} -> {args.out}", flush=True)
    bar.close()
    info = dict(settings, steps=step, low_res_steps_done=switch_step, loss_ema=loss_avg,
                elapsed_s=time.monotonic() - start, final=True)
    save_checkpoint(ema, args.out, info)
    if args.eval_per_class > 0:
        info["quality"] = evaluate(args.out, args.eval_per_class, args.eval_steps, args.eval_guidance)
        (args.out / "training_info.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        record_eval(args.out, info["quality"])
        print("quality:", json.dumps(info["quality"]), flush=True)
    size = sum(f.stat().st_size for f in args.out.iterdir())
    print(f"done: {step} steps in {(time.monotonic() - start) / 60:.1f} min, loss {loss_avg:.4f}, "
          f"saved {size / 1e6:.1f} MB to {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
