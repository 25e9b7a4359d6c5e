"""
Sample images: noise -> DiT prior -> latent -> the autoencoder's decoder -> picture.

  python sample.py                                 # 64 samples (DDIM, 50 steps) -> out/samples.png
  python sample.py --class_label 2 --cfg_scale 4   # only triangles, with stronger guidance
  python sample.py --sampler ddpm                  # the ancestral sampler, all 1000 steps
  python sample.py --eval                          # 2,000 samples scored -> out/metrics.json
  python sample.py --num_samples 50000 --save_npz out/samples.npz   # for the standard FID suites

It reads out/ae.pt (train_ae.py) and out/prior.pt (train_prior.py) and runs on cpu or cuda.
"""
import argparse
import json
import math
import os
import time

import numpy as np
import torch

from data import load_autoencoder, load_checkpoint, load_prior
from evaluate import score_samples
from model import GaussianDiffusion
from plumbing import (HelpFormatter, check_device, check_out_dir, checked, command, fail,
                      non_negative, positive_int, precision, save_grid, table_line, unit_interval)

# -----------------------------------------------------------------------------
parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
parser.add_argument("--out_dir", default="out",
                    help="where ae.pt and prior.pt are, and where pictures and metrics go")
parser.add_argument("--ae", help="the autoencoder checkpoint (default: out_dir/ae.pt)")
parser.add_argument("--prior", help="the prior checkpoint (default: out_dir/prior.pt)")
parser.add_argument("--output", help="the PNG grid to write (default: out_dir/samples.png)")
parser.add_argument("--num_samples", type=positive_int,
                    help="how many images (default: 64, or 2000 with --eval)")
parser.add_argument("--batch_size", type=positive_int, default=256, help="images sampled at once")
parser.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm"],
                    help="DDIM (few steps), or DDPM's ancestral sampler (all 1000 steps)")
parser.add_argument("--steps", type=checked(int, lambda v: 1 <= v <= 1000, "in 1..1000"),
                    help="DDIM's steps, of the prior's 1000 (default: 50)")
parser.add_argument("--eta", type=unit_interval, default=0.0,
                    help="DDIM's noise: 0 deterministic, 1 as noisy as DDPM")
parser.add_argument("--cfg_scale", type=non_negative,
                    help="the guidance scale, 1 = off (default: 5 with autoguidance, 3 with "
                         "classifier-free guidance, 1 when there is neither)")
parser.add_argument("--guide_below", type=checked(int, lambda v: 0 <= v <= 1000, "in 0..1000"),
                    default=500, help="guide only the steps t < this (of 1000; 1000 = every step)")
parser.add_argument("--guidance", default="auto", choices=["auto", "cfg"],
                    help="auto: autoguidance when there is a weaker prior to guide with, else "
                         "classifier-free guidance; cfg: classifier-free guidance")
parser.add_argument("--guide_prior",
                    help="autoguidance's weaker prior (default: prior_guide.pt beside the prior, "
                         "which train_prior.py keeps)")
parser.add_argument("--class_label", type=int, help="sample only this class (default: cycle)")
parser.add_argument("--no_ema", action="store_true",
                    help="use the raw prior weights instead of their EMA")
parser.add_argument("--seed", type=int, default=0, help="seeds the starting noise")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cpu, cuda, mps")
parser.add_argument("--dtype", choices=["float32", "bfloat16"],
                    help="the networks' precision, through autocast (default: bfloat16 on cuda)")
# evaluation: FD and friends in the features of an offline evaluator (evaluate.py), cached
parser.add_argument("--eval", action="store_true",
                    help="score the samples against held-out images -> out_dir/metrics.json")
parser.add_argument("--split", default="val", choices=["val", "test"],
                    help="--eval's reference images: val while choosing anything, test only for "
                         "final figures")
parser.add_argument("--eval_steps", type=positive_int, default=400,
                    help="training steps of the evaluator, if it is not cached yet")
parser.add_argument("--save_npz", help="also write the samples to this .npz as uint8 (N, H, W, C)")
args = parser.parse_args()


def check_output_file(path, option):
    """Before any work: a file this run will write must go into an existing directory (a typo in a
    path should cost a second, not a sampling run)."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        fail(f"{option} {path}: the directory {folder} does not exist; create it or pick another")
    if os.path.isdir(path):
        fail(f"{option} {path} is a directory: give a file name")


def check_prior_fits(prior_state, ae_state):
    """A prior only fits the autoencoder whose latents it was trained on: the same latents (their
    fingerprint), so also the same shape and scale. Another autoencoder's decoder would turn its
    samples into noise, however well both were trained."""
    c = ae_state["config"]
    side = ae_state["image_shape"][1] // 2 ** (len(c["ch_mult"]) - 1)
    shape = [c["z_channels"], side, side]
    same = prior_state["latent_shape"] == shape
    same = same and prior_state["latent_scale"] == ae_state["latent_scale"]
    same = same and prior_state.get("latents_fingerprint") == ae_state.get("latents_fingerprint")
    if not same:
        fail(f"{prior_path} was trained on other latents than {ae_path}'s (shape "
             f"{prior_state['latent_shape']} vs {shape}): retrain it with "
             f"{command('train_prior.py', '--out_dir', ae_dir)}")


# -----------------------------------------------------------------------------
# every check before any work, so a mistake never costs a sampling run or overwrites a file
if args.num_samples is None:  # FD in 128 dimensions needs samples well above 128 to be stable
    args.num_samples = 2000 if args.eval else 64
if args.eval and args.num_samples < 2:
    fail(f"--eval needs at least 2 samples to estimate a covariance, got {args.num_samples}")
if args.sampler == "ddpm" and args.steps not in (None, 1000):
    fail("the DDPM sampler walks all 1000 steps: drop --steps, or use --sampler ddim for fewer")
if args.sampler == "ddpm":  # DDIM with eta 1 on every step is DDPM's Algorithm 2
    args.steps, args.eta = 1000, 1.0
args.steps = args.steps or 50
if args.save_npz is not None and not args.save_npz.endswith(".npz"):
    fail(f"--save_npz {args.save_npz} must end in .npz (numpy would add the suffix)")
check_out_dir(args.out_dir)
output = args.output or os.path.join(args.out_dir, "samples.png")
check_output_file(output, "--output")
if args.save_npz:
    check_output_file(args.save_npz, "--save_npz")
device = check_device(args.device)
# the networks in bf16 on GPUs; the sampler's own arithmetic (guidance, the update) is float32
args.dtype, autocast = precision(device, args.dtype)

# -----------------------------------------------------------------------------
# the autoencoder and the prior, checked against each other
ae_path = args.ae or os.path.join(args.out_dir, "ae.pt")
prior_path = args.prior or os.path.join(args.out_dir, "prior.pt")
ae_dir = os.path.dirname(ae_path) or "."
make_ae = (command("train_ae.py", "--stage", "1", "--out_dir", ae_dir) + " && "
           + command("train_ae.py", "--stage", "2", "--out_dir", ae_dir))
ae, ae_state = load_autoencoder(ae_path, make_ae, device)
# the EMA weights by default: an average over the last ~1000 steps samples better than the last
make_prior = command("train_prior.py", "--out_dir", os.path.dirname(prior_path) or ".")
prior, prior_state = load_prior(prior_path, make_prior, device, ema=not args.no_ema)
if "latent_scale" not in ae_state:
    fail(f"{ae_path} is unfinished (no latent scale): finish it with "
         f"{command('train_ae.py', '--stage', ae_state['stage'], '--out_dir', ae_dir, '--resume')}")
check_prior_fits(prior_state, ae_state)
# autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself"): a
# weaker prior of the same latents, such as an early snapshot of the same run, makes the same kind
# of errors as the good one, only larger; guiding away from its prediction removes them, and needs
# no "no class" mode. The guidance scale and --guide_below apply as for classifier-free guidance
guide = None
guide_path = args.guide_prior or os.path.join(os.path.dirname(prior_path), "prior_guide.pt")
if args.guidance == "auto" and (args.guide_prior or os.path.isfile(guide_path)):
    guide, guide_state = load_prior(guide_path, make_prior, device)  # its EMA weights too
    same_task = guide_state["num_classes"] == prior_state["num_classes"]
    if not same_task or guide_state.get("latents_fingerprint") != prior_state.get("latents_fingerprint"):
        fail(f"{guide_path} is no weaker version of {prior_path} (other latents or classes): "
             f"guide with a prior of the same latents and classes, or use --guidance cfg")
if args.eval and ae_state["num_classes"] <= 1:
    fail("--eval's evaluator learns class labels, and this data has a single unlabelled class: "
         "write the samples with --save_npz and score them with an external FID suite")
if args.eval:  # the Gaussian row is fitted to the autoencoder's own cached latents
    latents_path = os.path.join(ae_dir, "latents.pt")
    make_latents = command("train_ae.py", "--stage", ae_state["stage"], "--out_dir", ae_dir)
    latents = load_checkpoint(latents_path, "latents", make_latents)
    if latents.get("fingerprint") != ae_state.get("latents_fingerprint"):
        fail(f"{latents_path} does not hold {ae_path}'s latents: rerun `{make_latents}`")
num_classes = prior_state["num_classes"]
latent_scale = prior_state["latent_scale"]
# guidance contrasts the conditional prediction with the "no class" one, which only a prior
# trained with label dropout has: an unconditional prior, or one trained with
# --class_dropout_prob 0, samples unguided
can_guide = num_classes > 0 and prior_state["dit_config"]["class_dropout_prob"] > 0
can_guide = can_guide or guide is not None  # autoguidance needs no "no class" mode
if num_classes == 0 and args.class_label is not None:
    fail("this prior is unconditional: drop --class_label, or train it without --unconditional")
if args.cfg_scale not in (None, 1.0) and not can_guide:
    fail(f"{prior_path} has no 'no class' mode to guide against (it is unconditional or was "
         f"trained with --class_dropout_prob 0): drop --cfg_scale")
if args.class_label is not None and not 0 <= args.class_label < num_classes:
    fail(f"--class_label {args.class_label} is out of range: this prior knows classes "
         f"0..{num_classes - 1}")
# Guidance acts only below t = 500 by default (--guide_below): at high noise a sample's class and
# layout are still open, and classifier-free guidance there pulls every sample towards a few
# prototypes of its class; once the layout is set, it sharpens the shape asked for. Autoguidance,
# where there is a weaker prior, sharpens more. Scales and boundary were chosen on the validation
# split (assets/RESULTS.md, "What do the main command's 15 minutes buy?")
if args.cfg_scale is None:  # guided by default
    args.cfg_scale = 1.0
    if can_guide:
        args.cfg_scale = 5.0 if guide is not None else 3.0
    if num_classes and not can_guide:
        print("the prior was trained without label dropout (--class_dropout_prob 0): "
              "sampling without guidance")
diffusion = GaussianDiffusion().to(device)


class Progress:
    """About ten lines with the rate and the time left, so a 50,000-sample run does not sit
    silent. Quiet when everything fits in one batch. The rate covers the whole path (prior and
    decoder): what a user of the model gets."""

    def __init__(self, what, total, batch_size):
        self.what, self.total, self.start = what, total, time.time()
        self.every = max(1, math.ceil(total / batch_size / 10))  # batches between lines
        self.quiet = total <= batch_size
        self.batches = 0

    def update(self, done):
        self.batches += 1
        if self.quiet or (self.batches % self.every and done < self.total):
            return
        rate = done / max(time.time() - self.start, 1e-9)
        print(f"{self.what}: {done}/{self.total} ({done / self.total:.0%}) | {rate:.1f}/s | "
              f"{(self.total - done) / rate:.0f}s left", flush=True)


def labels_of(start, count):
    """The classes asked for: one (ignored) label when unconditional, --class_label, or cycling
    through the classes, so a grid shows each of them and --eval gets balanced classes. A pure
    function of the sample's index: --eval knows what every sample was asked to be."""
    if num_classes == 0:
        return torch.zeros(count, dtype=torch.long)
    if args.class_label is not None:
        return torch.full((count,), args.class_label)
    return torch.arange(start, start + count) % num_classes


@torch.no_grad()
def generate(n, seed):
    """n decoded samples in [-1, 1], batch by batch: the same seed always gives the same images.
    Each batch: x_T ~ N(0, I) -> the prior's sampler -> a latent in unit-variance units -> the
    autoencoder's units -> the decoder. The prior never sees an image, only latents."""
    g = torch.Generator(device=device).manual_seed(seed)
    images, progress = [], Progress("sampling", n, args.batch_size)
    for start in range(0, n, args.batch_size):
        y = labels_of(start, min(args.batch_size, n - start)).to(device)
        # x_T ~ N(0, I): after 1000 noising steps the latent has forgotten the data
        noise = torch.randn((len(y), *prior_state["latent_shape"]), generator=g, device=device)
        # DDIM walks a --steps sub-sequence of the 1000 training steps (deterministic at eta 0);
        # DDPM walks all 1000 with fresh noise each step: the same model, 20x the network calls
        with autocast():
            z = diffusion.ddim_sample(prior, noise, y, args.steps, args.eta, args.cfg_scale,
                                      num_classes, g, args.guide_below, guide)
        images.append(decode(z / latent_scale))  # undo the unit-variance scaling first
        progress.update(start + len(y))
    return torch.cat(images)


@torch.no_grad()
def decode(z):
    """Latents (in the autoencoder's own units) -> images in [-1, 1] on the cpu, batch by batch.
    A fresh autocast context for each batch: never one object entered twice (see precision)."""
    parts = []
    for part in z.split(args.batch_size):
        with autocast():
            parts.append(ae.decode(part.to(device)).float().clamp(-1, 1).cpu())
    return torch.cat(parts)


# time the whole path (prior + decoder): images/s in the log is what a user of the model gets
start = time.time()
samples = generate(args.num_samples, args.seed)
elapsed = time.time() - start
save_grid(samples[:64], output, nrow=8)  # a grid shows at most 64; --save_npz keeps them all
kind = "autoguidance" if guide is not None else "cfg"
guided = f"{kind} {args.cfg_scale}"
if args.cfg_scale != 1 and args.guide_below < 1000:
    guided += f" below t={args.guide_below}"
print(f"wrote {min(64, len(samples))} of {len(samples)} samples ({args.sampler}, {args.steps} "
      f"steps, {guided}) to {output} in {elapsed:.1f}s, {len(samples) / elapsed:.1f} images/s")
if args.save_npz:
    # the layout of the ADM / guided-diffusion evaluation suite: uint8 pixels, (N, H, W, C), so
    # the standard FID / IS code (Inception features, downloaded by the user) can score them
    pixels = ((samples + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    pixels = pixels.permute(0, 2, 3, 1).numpy()
    np.savez(args.save_npz, arr_0=pixels)
    print(f"wrote {pixels.shape} uint8 to {args.save_npz}")

# -----------------------------------------------------------------------------
# --eval: how close are the samples to held-out images, next to the rows that put the numbers in
# context (evaluate.score_samples). FD is measured in the features of an evaluator CNN trained
# offline on this dataset: it is not FID, and only comparable under the same evaluator.
if args.eval:  # (latents.pt, for the Gaussian row, was loaded and checked before sampling)
    asked = labels_of(0, args.num_samples) if num_classes else None
    metrics = score_samples(samples, asked, ae, ae_state, latents, args.out_dir, device,
                            args.eval_steps, args.seed, args.batch_size, args.split)
    metrics["prior_loss"] = prior_state.get("loss")
    metrics.update(ae=ae_path, prior=prior_path)
    metrics["sampler"] = {"sampler": args.sampler, "steps": args.steps, "eta": args.eta,
                          "cfg_scale": args.cfg_scale, "guide_below": args.guide_below,
                          "ema": not args.no_ema, "seed": args.seed, "dtype": args.dtype,
                          "guide_prior": guide_path if guide is not None else None}
    # one table: every row against the same reference images, so the numbers compare; the last
    # row, real images of the other held-out split, is the floor: the scores' own sampling noise
    scores = metrics["scores"]
    floor_name = list(scores)[-1]
    print(f"\nFD in the evaluator's 128-d features (validation accuracy "
          f"{metrics['evaluator']['accuracy']:.3f}), each row against the "
          f"{metrics['num_reference']} {args.split} images")
    columns = [("count", "images", "d"), ("fd", "FD", ".3f"), ("fd_mean_term", "(means)", ".3f"),
               ("precision", "precision", ".3f"), ("recall", "recall", ".3f")]
    shapes = "render_iou" in scores[floor_name]
    if shapes:
        columns.append(("render_iou", "renderIoU", ".3f"))
    print(table_line("", None, columns))
    for name, row in scores.items():
        print(table_line(name, row, columns))
    if shapes:  # the built-in shapes: each sample against its ideal shape, per class
        samples_iou, floor_iou = [" / ".join("-" if v is None else f"{v:.3f}" for v in values)
                                  for values in (scores["DiT samples"]["render_iou_per_class"],
                                                 scores[floor_name]["render_iou_per_class"])]
        print(f"render IoU per class (circle / square / triangle): samples {samples_iou}, "
              f"floor {floor_iou}")
    if asked is not None:  # a conditional prior: is the class right, and is the class mix?
        shares = ", ".join(f"{share:.2f}" for share in metrics["class_shares"])
        print(f"the evaluator sees the requested class in {metrics['class_match']:.1%} of the "
              f"DiT samples; it sees the classes in the shares {shares}")
    metrics_path = os.path.join(args.out_dir, "metrics.json")
    with open(metrics_path, "w") as f:
        json.dump(metrics, f, indent=2)
    print(f"wrote {metrics_path}")
