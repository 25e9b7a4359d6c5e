"""
Sample images: noise -> DiT prior (DDIM or DDPM) -> latent -> autoencoder decoder -> picture.

  python sample.py                                  # 64 samples, DDIM 50 steps, CFG 3 below t=500, EMA -> out/samples.png
  python sample.py --class_label 2 --cfg_scale 4    # only triangles, with stronger guidance
  python sample.py --sampler ddpm --steps 1000      # the ancestral sampler, all 1000 steps
  python sample.py --eval                           # 2,000 samples scored on the validation images -> out/metrics.json
  python sample.py --num_samples 50000 --save_npz out/samples.npz   # for the standard FID/IS suites

It reads out/ae.pt (train_ae.py) and out/prior.pt (train_prior.py) and runs on cpu or cuda.
"""
import argparse
import contextlib
import json
import os
import time

import numpy as np
import torch

from distance import score_samples
from model import GaussianDiffusion
from plumbing import (HelpFormatter, Progress, check_device, check_out_dir, check_output_file, command, fail,
                      load_autoencoder, load_checkpoint, load_prior, save_grid, table_line)

# -----------------------------------------------------------------------------
parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
parser.add_argument("--out_dir", default="out", help="where ae.pt and prior.pt are, and where pictures and metrics go")
parser.add_argument("--ae", help="the autoencoder checkpoint (default: out_dir/ae.pt)")
parser.add_argument("--prior", help="the prior checkpoint (default: out_dir/prior.pt)")
parser.add_argument("--output", help="the PNG grid to write (default: out_dir/samples.png)")
parser.add_argument("--num_samples", type=int, help="how many images (default: 64, or 2000 with --eval)")
parser.add_argument("--batch_size", type=int, default=256, help="images sampled at once")
parser.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm"], help="DDIM (few steps) or ancestral DDPM")
parser.add_argument("--steps", type=int, help="denoising steps (default: 50 for DDIM; DDPM uses all 1000)")
parser.add_argument("--eta", type=float, default=0.0,
                    help="DDIM noise in [0, 1]: 0 deterministic, 1 like DDPM; 0.5 sharpens a long-trained prior's shapes")
parser.add_argument("--cfg_scale", type=float,
                    help="classifier-free guidance scale, 1 = off (default: 3 for a class-conditional prior, else 1)")
parser.add_argument("--guide_below", type=int, default=500,
                    help="guide only the steps t < this (of 1000): guiding the noisiest steps costs FD; 1000 = all")
parser.add_argument("--class_label", type=int, help="sample only this class (default: cycle through all)")
parser.add_argument("--no_ema", action="store_true", help="use the raw prior weights instead of their EMA")
parser.add_argument("--seed", type=int, default=0, help="seeds the starting noise")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, mps")
# evaluation: FD and friends in the feature space of distance.py's offline evaluator (trained once, cached)
parser.add_argument("--eval", action="store_true", help="score the samples against held-out images -> out_dir/metrics.json")
parser.add_argument("--split", default="val", choices=["val", "test"],
                    help="--eval's reference images: val while choosing anything, test only for final figures")
parser.add_argument("--eval_steps", type=int, default=400, help="training steps of the evaluator, if it is not cached yet")
parser.add_argument("--save_npz", help="also write the samples to this .npz as uint8 (N, H, W, C)")
args = parser.parse_args()

# -----------------------------------------------------------------------------
# every check before any work, so a mistake never costs a sampling run or overwrites a file
if args.num_samples is None:  # FD in 128 dimensions needs samples well above 128 to be stable
    args.num_samples = 2000 if args.eval else 64
if args.num_samples <= 0 or args.batch_size <= 0 or args.eval_steps <= 0:
    fail("--num_samples, --batch_size and --eval_steps must be positive")
if args.eval and args.num_samples < 2:
    fail(f"--eval needs at least 2 samples to estimate a covariance, got {args.num_samples} (use 2000 or more)")
if args.cfg_scale is not None and args.cfg_scale < 0:
    fail(f"--cfg_scale must be 0 or more (1 = no guidance), got {args.cfg_scale}")
if not 0 <= args.guide_below <= 1000:
    fail(f"--guide_below is a diffusion step in [0, 1000] (1000: guide every step), got {args.guide_below}")
if not 0 <= args.eta <= 1:  # beyond 1 DDIM's noise would exceed the variance left to it: NaN samples
    fail(f"--eta must lie in [0, 1] (0 = deterministic DDIM, 1 = as noisy as DDPM), got {args.eta}")
if args.steps is None:
    args.steps = 50 if args.sampler == "ddim" else 1000
if not 1 <= args.steps <= 1000:
    fail(f"--steps must be between 1 and the 1000 training steps, got {args.steps}")
if args.sampler == "ddpm" and args.steps != 1000:
    fail("the DDPM sampler walks all 1000 steps: drop --steps, or use --sampler ddim for fewer")
if args.save_npz is not None and not args.save_npz.endswith(".npz"):
    fail(f"--save_npz {args.save_npz} must end in .npz (numpy would add the suffix and the name would not match)")
check_out_dir(args.out_dir)
output = args.output or os.path.join(args.out_dir, "samples.png")
check_output_file(output, "--output")
if args.save_npz:
    check_output_file(args.save_npz, "--save_npz")
device = check_device(args.device)
# bf16 on GPUs; the sampler's own arithmetic (x0 prediction, the update) stays float32 either way
autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else contextlib.nullcontext()

# -----------------------------------------------------------------------------
# the autoencoder and the prior, checked against each other
ae_path = args.ae or os.path.join(args.out_dir, "ae.pt")
prior_path = args.prior or os.path.join(args.out_dir, "prior.pt")
ae_dir = os.path.dirname(ae_path) or "."
ae, ae_state = load_autoencoder(ae_path, command("train_ae.py", "--stage", "1", "--out_dir", ae_dir) + " && "
                                + command("train_ae.py", "--stage", "2", "--out_dir", ae_dir), device)
# the EMA weights by default: an average over the last ~1000 steps samples better than the last step's
prior, prior_state = load_prior(prior_path, command("train_prior.py", "--out_dir", os.path.dirname(prior_path) or "."),
                                device, ema=not args.no_ema)
if "latent_scale" not in ae_state:
    fail(f"{ae_path} is unfinished (no latent scale): finish it with train_ae.py --stage {ae_state['stage']} --resume")
# a prior only fits the autoencoder whose latents it was trained on: same latents (fingerprint, if both
# checkpoints have one), same shape, same scale
c = ae_state["config"]
side = ae_state["image_shape"][1] // 2 ** (len(c["ch_mult"]) - 1)
prints = prior_state.get("latents_fingerprint"), ae_state.get("latents_fingerprint")  # None in older checkpoints
same_latents = None in prints or prints[0] == prints[1]
if (prior_state["latent_shape"] != [c["z_channels"], side, side] or prior_state["latent_scale"] != ae_state["latent_scale"]
        or not same_latents):
    fail(f"{prior_path} was trained on other latents than {ae_path}'s (shape {prior_state['latent_shape']} vs "
         f"{[c['z_channels'], side, side]}): retrain it with {command('train_prior.py', '--out_dir', ae_dir)}")
num_classes, latent_scale = prior_state["num_classes"], prior_state["latent_scale"]
# guidance contrasts the conditional prediction with the "no class" one, which only a prior trained with
# label dropout has: an unconditional prior, or one trained with --class_dropout_prob 0, samples unguided
can_guide = num_classes > 0 and prior_state["dit_config"]["class_dropout_prob"] > 0
if num_classes == 0 and args.class_label is not None:
    fail("this prior is unconditional: drop --class_label, or train it without --unconditional")
if args.cfg_scale not in (None, 1.0) and not can_guide:
    fail(f"{prior_path} has no 'no class' mode to guide against (it is unconditional or was trained with "
         f"--class_dropout_prob 0): drop --cfg_scale")
if args.class_label is not None and not 0 <= args.class_label < num_classes:
    fail(f"--class_label {args.class_label} is out of range: this prior knows classes 0..{num_classes - 1}")
# Why guidance acts only below t = 500 (--guide_below): at high noise the sample's class and layout are still
# open, and guidance there pulls every sample towards a few prototypes of its class (FD and the class mix
# suffer); once the layout is set, guidance sharpens the asked-for shape. Scale 3 below t = 500 was chosen on
# the validation split (README.md, "Results", "Where guidance acts").
if args.cfg_scale is None:  # guided by default
    args.cfg_scale = 3.0 if can_guide else 1.0
    if num_classes and not can_guide:
        print("the prior was trained without label dropout (--class_dropout_prob 0): sampling without guidance")
diffusion = GaussianDiffusion().to(device)


@torch.no_grad()
def generate(n, seed):
    """n decoded samples in [-1, 1]: the same seed always gives the same images."""
    g = torch.Generator(device=device).manual_seed(seed)
    images, progress = [], Progress("sampling", n, args.batch_size)
    for start in range(0, n, args.batch_size):
        b = min(args.batch_size, n - start)
        if num_classes == 0:  # an unconditional prior has one (ignored) label
            y = torch.zeros(b, dtype=torch.long, device=device)
        elif args.class_label is not None:
            y = torch.full((b,), args.class_label, device=device)
        else:  # cycle through the classes, so a grid shows each of them (and --eval gets balanced classes)
            y = (torch.arange(start, start + b, device=device) % num_classes)
        # x_T ~ N(0, I): after 1000 noising steps the latent has forgotten the data (abar_T ~ 4e-5)
        noise = torch.randn((b, *prior_state["latent_shape"]), generator=g, device=device)
        with autocast:
            # DDIM walks a --steps subsequence (50) of the 1000 training steps, deterministic at eta 0;
            # DDPM walks all 1000 with fresh noise each step: the same model, 20x the network calls
            if args.sampler == "ddim":
                z = diffusion.ddim_sample(prior, noise, y, args.steps, args.eta, args.cfg_scale, num_classes, g,
                                          args.guide_below)
            else:
                z = diffusion.ddpm_sample(prior, noise, y, args.cfg_scale, num_classes, g, args.guide_below)
            images.append(decode(z.float() / latent_scale))  # undo the unit-variance scaling first
        progress.update(start + b)
    return torch.cat(images)


@torch.no_grad()
def decode(z):
    """Latents (in the autoencoder's own units) -> images in [-1, 1] on the cpu, batch by batch."""
    with autocast:
        return torch.cat([ae.decode(part.to(device)).float().clamp(-1, 1).cpu() for part in z.split(args.batch_size)])


# time the whole path (prior + decoder): images/s in the log is what a user of the model gets
t0 = time.time()
samples = generate(args.num_samples, args.seed)
elapsed = time.time() - t0
save_grid(samples[:64], output, nrow=8)  # a grid shows at most 64; --save_npz keeps them all
guided = f"cfg {args.cfg_scale}" + (f" below t={args.guide_below}" if args.cfg_scale != 1 and args.guide_below < 1000 else "")
print(f"wrote {min(64, len(samples))} of {len(samples)} samples ({args.sampler}, {args.steps} steps, {guided}) "
      f"to {output} in {elapsed:.1f}s, {len(samples) / elapsed:.1f} images/s")
if args.save_npz:
    # the layout of the ADM / guided-diffusion evaluation suite: uint8 pixels, (N, H, W, C), key arr_0
    pixels = ((samples + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.savez(args.save_npz, arr_0=pixels)
    print(f"wrote {pixels.shape} uint8 to {args.save_npz}")

# -----------------------------------------------------------------------------
# --eval: how close are the samples to held-out images, next to the references that put the number in
# context (distance.score_samples). FD is measured in the features of distance.py's evaluator CNN,
# trained offline on this dataset: it is not FID, and only comparable under the same evaluator.
if args.eval:
    latents = load_checkpoint(os.path.join(ae_dir, "latents.pt"), "latents",
                              command("train_ae.py", "--stage", ae_state["stage"], "--out_dir", ae_dir))
    asked = None  # the class each sample was asked for, as generate() cycles them
    if num_classes:
        asked = torch.arange(args.num_samples) % num_classes if args.class_label is None else \
            torch.full((args.num_samples,), args.class_label)
    metrics = score_samples(samples, asked, ae, ae_state, latents, args.out_dir, device, args.eval_steps, args.seed,
                            args.batch_size, args.split)
    metrics.update(prior_loss=prior_state.get("loss"), ae=ae_path, prior=prior_path,
                   sampler={"sampler": args.sampler, "steps": args.steps, "eta": args.eta, "cfg_scale": args.cfg_scale,
                            "guide_below": args.guide_below, "ema": not args.no_ema, "seed": args.seed})
    scores, floor_name = metrics["scores"], list(metrics["scores"])[-1]  # the last row: the real images
    print(f"\nFD in the evaluator's 128-d features (validation accuracy {metrics['evaluator']['accuracy']:.3f}), "
          f"each row against the {metrics['num_reference']} {args.split} images")
    columns = [("count", "images", "d"), ("fd", "FD", ".3f"), ("fd_mean_term", "(means)", ".3f"),
               ("precision", "precision", ".3f"), ("recall", "recall", ".3f")]
    columns += [("render_iou", "renderIoU", ".3f")] if "render_iou" in scores[floor_name] else []
    print("\n".join([table_line("", None, columns)] + [table_line(name, row, columns) for name, row in scores.items()]))
    if "render_iou" in scores[floor_name]:  # the built-in shapes: each sample against its ideal shape
        print("render IoU per class (circle, square, triangle): samples "
              + " / ".join(f"{v:.3f}" for v in scores["DiT samples"]["render_iou_per_class"]) + ", floor "
              + " / ".join(f"{v:.3f}" for v in scores[floor_name]["render_iou_per_class"]))
    if asked is not None:
        print(f"the evaluator sees the requested class in {metrics['class_match']:.1%} of the DiT samples; "
              f"it sees the classes in the shares {', '.join(f'{share:.2f}' for share in metrics['class_shares'])}")
    with open(os.path.join(args.out_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    print(f"wrote {os.path.join(args.out_dir, 'metrics.json')}")
