"""Train fxdit's shipped Flux demo model: a tiny class-conditional diffusers Flux transformer on sklearn's digits.

The model is a ``diffusers.FluxTransformer2DModel`` in pixel space (see :mod:`fxdit.apps.models.flux`): 32x32
one-channel images (the 8x8 digits upsampled bilinearly) packed into 2x2-patch tokens (256 tokens of 4 channels),
hidden 128 (4 heads x 32), 2 double-stream + 4 single-stream blocks. The class is the "prompt": a learned table
(:class:`~fxdit.apps.models.flux.DigitTextEncoder`) gives every class 4 text tokens of width 64
(``encoder_hidden_states``, joint text+image attention) and a pooled vector of width 64 (``pooled_projections``);
row 10 is the null class of classifier-free guidance. The script drops 10 % of the labels to the null class.

Training: flow matching (rectified flow): ``x_σ = (1 − σ)·x_0 + σ·ε``, the model predicts ``v = ε − x_0`` (MSE),
``σ`` drawn from a logit-normal (mean 0, std 1) mixed with a uniform (``--uniform-frac``), ``timestep = σ`` (the
transformer multiplies by 1000). AdamW (lr 4e-4, linear warmup, constant, then a linear decay to 10 % over the last
``--decay-frac``), batch 32, light augmentation (random shifts), adaLN-Zero initialisation (zero modulation and
output layers), an EMA of the weights (what gets saved). Progressive resolution: the first ``--low-res-frac`` of the
budget runs at 16x16 pixels (64 tokens) with image position ids on the 32x32 token grid (``2·i + 0.5``), the rest at
32x32. It stops at ``--max-steps`` or when ``--time-budget-min`` runs out, and saves a checkpoint every
``--checkpoint-min`` minutes. To reproduce a shipped model, pass the step counts it reports (``--max-steps``,
``--low-res-steps``) with the same seed and thread count.

Saved (``--out``): the transformer in fp16 (``save_pretrained``), ``text_encoder/``, the
``FlowMatchEulerDiscreteScheduler`` config, ``training_info.json``. After training (or with ``--eval-only``) the
quality check samples ``--eval-per-class`` images per class with :func:`fxdit.apps.flow_sampler.flow_sample` at each
``--eval-guidance`` and judges them with the shipped digit classifier; results go to ``evals`` in
``training_info.json``.

Usage::

    python tools/train_flux_demo.py --out fxdit/apps/data/demo_flux --time-budget-min 50
    python tools/train_flux_demo.py --out fxdit/apps/data/demo_flux --eval-only --eval-guidance 1.5 2 3
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_demo_model import load_digit_images, random_shift  # noqa: E402

from fxdit.apps.models import flux as demo_flux  # noqa: E402

NUM_CLASSES = demo_flux.NUM_CLASSES
NULL_CLASS = demo_flux.NULL_CLASS
TEXT_TOKENS = 4


def build(seed: int) -> tuple[torch.nn.Module, demo_flux.DigitTextEncoder]:
    """The transformer (adaLN-Zero initialised) and the class text encoder, seeded."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    cfg = demo_flux.transformer_config()
    model = FluxTransformer2DModel(**cfg)
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and (name.endswith("norm1.linear") or name.endswith("norm1_context.linear")
                                                 or name.endswith("norm.linear") or name == "norm_out.linear"
                                                 or name == "proj_out"):
            torch.nn.init.zeros_(mod.weight)
            torch.nn.init.zeros_(mod.bias)
    enc = demo_flux.DigitTextEncoder(NUM_CLASSES, TEXT_TOKENS, cfg["joint_attention_dim"], cfg["pooled_projection_dim"])
    return model, enc


def save_checkpoint(ema: torch.nn.Module, ema_enc: demo_flux.DigitTextEncoder, out: Path, info: dict) -> None:
    """Save the EMA transformer (fp16), text encoder, scheduler config and training info, replacing ``out``
    atomically."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    tmp = out.parent / (out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    half = copy.deepcopy(ema).to(torch.float16)
    half.save_pretrained(tmp, safe_serialization=True)
    ema_enc.save(tmp / "text_encoder")
    FlowMatchEulerDiscreteScheduler(**demo_flux.scheduler_config()).save_pretrained(tmp)
    (tmp / "training_info.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    old = out.parent / (out.name + ".old")
    if out.exists():
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
    tmp.rename(out)
    if old.exists():
        shutil.rmtree(old)


def evaluate(folder: Path, per_class: int, steps: int, guidance: float, batch: int = 50) -> dict:
    """The quality bar: ``steps`` Euler steps + CFG for ``per_class`` samples of every class, judged by the shipped
    digit classifier (accuracy, IS-like score, Fréchet distance in its feature space)."""
    from fxdit.apps import flow_sampler
    from fxdit.apps.quality import SampleScorer

    demo = demo_flux.load_flux_demo(folder)
    labels = flow_sampler.class_labels(range(NUM_CLASSES), per_class)
    noise = flow_sampler.initial_noise(len(labels), (demo.channels, *demo.image_size), seed=1234)
    den = flow_sampler.FlowDenoiser.for_demo(demo)
    t0 = time.monotonic()
    chunks = []
    with torch.no_grad():
        for i in range(0, len(labels), batch):
            chunks.append(flow_sampler.flow_sample(den, labels[i:i + batch], noise[i:i + batch], demo.scheduler,
                                                   steps=steps, guidance_scale=guidance, desc="quality check"))
    images = torch.cat(chunks)
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


def sample_sigma(n: int, uniform_frac: float, gen: torch.Generator) -> torch.Tensor:
    """σ in (0, 1): logit-normal(0, 1), with a ``uniform_frac`` share drawn uniformly instead."""
    logit = torch.sigmoid(torch.randn(n, generator=gen))
    uni = torch.rand(n, generator=gen)
    pick = torch.rand(n, generator=gen) < uniform_frac
    return torch.where(pick, uni, logit).clamp(1e-4, 1.0 - 1e-4)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("fxdit/apps/data/demo_flux"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument("--label-dropout", type=float, default=0.1)
    p.add_argument("--uniform-frac", type=float, default=0.2, help="share of σ drawn uniformly (rest logit-normal)")
    p.add_argument("--max-shift", type=int, default=2, help="random shift in pixels at 32x32 (scaled at --low-res)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="total steps (default: run until --time-budget-min; the lr decay then follows the clock)")
    p.add_argument("--low-res", type=int, default=16, help="pixel size of the first training phase")
    p.add_argument("--low-res-steps", type=int, default=None,
                   help="steps at --low-res (default: the first --low-res-frac of the time budget)")
    p.add_argument("--low-res-frac", type=float, default=0.7)
    p.add_argument("--decay-frac", type=float, default=0.3,
                   help="final fraction of the run (steps, or time without --max-steps) over which the lr decays "
                        "linearly to 10%%")
    p.add_argument("--time-budget-min", type=float, default=50.0)
    p.add_argument("--checkpoint-min", type=float, default=10.0)
    p.add_argument("--eval-per-class", type=int, default=10,
                   help="after training: samples per class for the quality check (0: skip)")
    p.add_argument("--eval-steps", type=int, default=28)
    p.add_argument("--eval-guidance", type=float, nargs="+", default=[2.0])
    p.add_argument("--eval-only", action="store_true", help="only run the quality check on --out")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.eval_only:
        for g in args.eval_guidance:
            result = evaluate(args.out, args.eval_per_class, args.eval_steps, g)
            record_eval(args.out, result)
            print(json.dumps(result), flush=True)
        return 0

    from tqdm import tqdm

    gen = torch.Generator().manual_seed(args.seed)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings.update(model=demo_flux.transformer_config(), scheduler=demo_flux.scheduler_config(),
                    text_tokens=TEXT_TOKENS, image_size=32, torch=torch.__version__)
    print("settings:", json.dumps(settings, sort_keys=True), flush=True)

    x_all, y_all = load_digit_images(32)
    use_low = args.low_res_steps != 0 and args.low_res_frac > 0 and args.low_res < 32
    x_low = load_digit_images(args.low_res)[0] if use_low else None
    ids_full = demo_flux.image_ids(32, 32)
    ids_low = demo_flux.image_ids(args.low_res, args.low_res, scale=32 / args.low_res,
                                  offset=(32 / args.low_res - 1) / 2) if use_low else None
    txt_ids = demo_flux.text_ids(TEXT_TOKENS)
    model, enc = build(args.seed)
    n_params = sum(p.numel() for p in model.parameters()) + sum(p.numel() for p in enc.parameters())
    print(f"model: {n_params / 1e6:.2f} M params, data: {tuple(x_all.shape)}", flush=True)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    ema_enc = copy.deepcopy(enc).eval().requires_grad_(False)
    params = list(model.parameters()) + list(enc.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    budget = args.time_budget_min * 60.0
    start = time.monotonic()

    def progress(s: int) -> float:
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
    loss_avg = math.nan
    step = 0
    model.train()
    enc.train()
    max_steps = args.max_steps if args.max_steps is not None else 10**9
    bar = tqdm(total=args.max_steps, desc="train Flux demo", mininterval=30.0, file=sys.stdout)

    def info_now(final: bool) -> dict:
        return dict(settings, steps=step, low_res_steps_done=switch_step, loss_ema=loss_avg,
                    elapsed_s=round(time.monotonic() - start, 1), final=final)

    while step < max_steps and time.monotonic() - start < budget:
        if cursor + args.batch > n:
            perm = torch.randperm(n, generator=gen)
            cursor = 0
        idx = perm[cursor: cursor + args.batch]
        cursor += args.batch
        low = x_low is not None and low_res_phase(step)
        if not low and switch_step is None:
            switch_step = step
            print(f"step {step}: switching to 32x32 (to reproduce: --low-res-steps {step})", flush=True)
        x0 = (random_shift(x_low[idx], max(1, args.max_shift * args.low_res // 32), gen) if low
              else random_shift(x_all[idx], args.max_shift, gen))
        y = y_all[idx].clone()
        y[torch.rand(y.shape[0], generator=gen) < args.label_dropout] = NULL_CLASS
        sigma = sample_sigma(y.shape[0], args.uniform_frac, gen)
        eps = torch.randn(x0.shape, generator=gen)
        s4 = sigma.view(-1, 1, 1, 1)
        xt = (1.0 - s4) * x0 + s4 * eps
        ehs, pooled = enc(y)
        pred = model(hidden_states=demo_flux.pack(xt), encoder_hidden_states=ehs, pooled_projections=pooled,
                     timestep=sigma, img_ids=ids_low if low else ids_full, txt_ids=txt_ids, return_dict=False)[0]
        loss = F.mse_loss(pred, demo_flux.pack(eps - x0))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        step += 1
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(list(ema.parameters()) + list(ema_enc.parameters()), params):
                pe.lerp_(pm.detach(), 1.0 - decay)
        loss_avg = loss.item() if math.isnan(loss_avg) else 0.98 * loss_avg + 0.02 * loss.item()
        bar.update(1)
        if step % 50 == 0:
            el = time.monotonic() - start
            print(f"step {step} {'low-res' if low else '32x32'} loss {loss_avg:.4f} lr {sched.get_last_lr()[0]:.2e} "
                  f"elapsed {el / 60:.1f} min ({el / step:.2f} s/step)", flush=True)
        if time.monotonic() - last_ckpt > args.checkpoint_min * 60.0:
            save_checkpoint(ema, ema_enc, args.out, info_now(False))
            last_ckpt = time.monotonic()
            print(f"checkpoint at step {step} -> {args.out}", flush=True)
    bar.close()
    save_checkpoint(ema, ema_enc, args.out, info_now(True))
    print(f"trained: {step} steps in {(time.monotonic() - start) / 60:.1f} min, loss {loss_avg:.4f}", flush=True)
    if args.eval_per_class > 0:
        for g in args.eval_guidance:
            result = evaluate(args.out, args.eval_per_class, args.eval_steps, g)
            record_eval(args.out, result)
            print("quality:", json.dumps(result), flush=True)
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"done: {step} steps, saved {size / 1e6:.1f} MB to {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
