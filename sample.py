"""
Sample images: noise -> DiT prior (DDIM or DDPM) -> latent -> autoencoder decoder -> picture.

  python sample.py                                  # 64 samples, DDIM 50 steps, CFG 2, EMA weights -> out/samples.png
  python sample.py --class_label 2 --cfg_scale 3    # only triangles, with classifier-free guidance
  python sample.py --sampler ddpm --steps 1000      # the ancestral sampler, all 1000 steps
  python sample.py --eval                           # 2,000 samples scored against held-out images -> out/metrics.json
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

from data import check_out_dir, fail, get_dataset, load_checkpoint, save_grid
from model import Autoencoder, DiT, GaussianDiffusion

# -----------------------------------------------------------------------------
parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--out_dir", default="out", help="where ae.pt and prior.pt are, and where pictures go")
parser.add_argument("--output", default=None, help="the PNG grid to write (default: out_dir/samples.png)")
parser.add_argument("--num_samples", type=int, default=None, help="how many images (default: 64, or 2000 with --eval)")
parser.add_argument("--batch_size", type=int, default=256, help="images sampled at once")
parser.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm"], help="DDIM (few steps) or ancestral DDPM")
parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: 50 for DDIM; DDPM uses all 1000)")
parser.add_argument("--eta", type=float, default=0.0, help="DDIM noise: 0 deterministic, 1 stochastic like DDPM")
parser.add_argument("--cfg_scale", type=float, default=None,
                    help="classifier-free guidance scale, 1 = off (default: 2 for a class-conditional prior, else 1)")
parser.add_argument("--class_label", type=int, default=None, help="sample only this class (default: cycle through all)")
parser.add_argument("--no_ema", action="store_true", help="use the raw prior weights instead of their EMA")
parser.add_argument("--seed", type=int, default=0, help="seeds the starting noise")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, mps")
# evaluation: FD in the feature space of the offline evaluator of distance.py (trained once, cached)
parser.add_argument("--eval", action="store_true", help="score the samples against the held-out set -> out_dir/metrics.json")
parser.add_argument("--eval_steps", type=int, default=400, help="training steps of the evaluator, if it is not cached yet")
parser.add_argument("--save_npz", default=None, help="also write the samples to this .npz as uint8 (N, H, W, C)")
args = parser.parse_args()
if args.num_samples is None:  # FD in 128 dimensions needs samples well above 128 to be stable
    args.num_samples = 2000 if args.eval else 64
if args.num_samples <= 0 or args.batch_size <= 0 or args.eval_steps <= 0:
    fail("--num_samples, --batch_size and --eval_steps must be positive")
if args.eval and args.num_samples < 2:
    fail(f"--eval needs at least 2 samples to estimate a covariance, got {args.num_samples} (use 2000 or more)")
if args.cfg_scale is not None and args.cfg_scale < 0:
    fail(f"--cfg_scale must be 0 or more (1 = no guidance), got {args.cfg_scale}")
if args.steps is None:
    args.steps = 50 if args.sampler == "ddim" else 1000
if not 1 <= args.steps <= 1000:
    fail(f"--steps must be between 1 and the 1000 training steps, got {args.steps}")
if args.sampler == "ddpm" and args.steps != 1000:
    fail("the DDPM sampler walks all 1000 steps: drop --steps, or use --sampler ddim for fewer")
if args.save_npz is not None and not args.save_npz.endswith(".npz"):
    fail(f"--save_npz {args.save_npz} must end in .npz (numpy would add the suffix and the name would not match)")
check_out_dir(args.out_dir, True)
output = args.output or os.path.join(args.out_dir, "samples.png")
device = args.device
# bf16 on GPUs; the sampler's own arithmetic (x0 prediction, the update) stays float32 either way
autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else contextlib.nullcontext()

# -----------------------------------------------------------------------------
# the autoencoder and the prior, checked against each other
ae_state = load_checkpoint(os.path.join(args.out_dir, "ae.pt"), "autoencoder",
                           f"python train_ae.py --stage 1 --out_dir {args.out_dir}, then --stage 2")
prior_state = load_checkpoint(os.path.join(args.out_dir, "prior.pt"), "prior",
                              f"python train_prior.py --out_dir {args.out_dir}")
c = ae_state["config"]
ae = Autoencoder(ae_state["image_shape"][0], c["ch"], c["ch_mult"], c["num_res_blocks"], c["z_channels"])
ae.load_state_dict(ae_state["model"])
ae.to(device).eval()
side = ae_state["image_shape"][1] // 2 ** (len(c["ch_mult"]) - 1)
if "latent_scale" not in ae_state:
    fail(f"{args.out_dir}/ae.pt is unfinished (no latent scale): finish it with train_ae.py --resume")
# a prior only fits the autoencoder whose latents it was trained on: same shape, same scale
if prior_state["latent_shape"] != [c["z_channels"], side, side] or prior_state["latent_scale"] != ae_state["latent_scale"]:
    fail(f"prior.pt was trained on latents of shape {prior_state['latent_shape']} (scale {prior_state['latent_scale']:.4f}), "
         f"not on this autoencoder's {[c['z_channels'], side, side]} (scale {ae_state['latent_scale']:.4f}): "
         f"retrain with python train_prior.py --out_dir {args.out_dir}")
# the EMA weights by default: an average over the last ~1000 steps samples better than the last step's
prior = DiT(**prior_state["dit_config"])
prior.load_state_dict(prior_state["model" if args.no_ema else "ema"])
prior.to(device).eval()  # important! eval mode: no label dropout, the labels we pass are the labels used
num_classes, latent_scale = prior_state["num_classes"], prior_state["latent_scale"]
# guidance contrasts the conditional and the no-class prediction: an unconditional prior has only one
if num_classes == 0 and (args.cfg_scale not in (None, 1.0) or args.class_label is not None):
    fail("this prior is unconditional: drop --cfg_scale and --class_label, or train without --unconditional")
if args.class_label is not None and not 0 <= args.class_label < num_classes:
    fail(f"--class_label {args.class_label} is out of range: this prior knows classes 0..{num_classes - 1}")
if args.cfg_scale is None:  # guided by default: README's sweep gave FD 27.2 at scale 1, 18.6 at 2, 28.2 at 3
    args.cfg_scale = 2.0 if num_classes else 1.0
diffusion = GaussianDiffusion().to(device)


@torch.no_grad()
def generate(n, seed):
    """n decoded samples in [-1, 1]: the same seed always gives the same images."""
    g = torch.Generator(device=device).manual_seed(seed)
    images = []
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
                z = diffusion.ddim_sample(prior, noise, y, args.steps, args.eta, args.cfg_scale, num_classes, g)
            else:
                z = diffusion.ddpm_sample(prior, noise, y, args.cfg_scale, num_classes, g)
            images.append(decode(z.float() / latent_scale))  # undo the unit-variance scaling first
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
print(f"wrote {min(64, len(samples))} of {len(samples)} samples ({args.sampler}, {args.steps} steps, cfg {args.cfg_scale}) "
      f"to {output} in {elapsed:.1f}s, {len(samples) / elapsed:.1f} images/s")
if args.save_npz:
    # the layout of the ADM / guided-diffusion evaluation suite: uint8 pixels, (N, H, W, C), key arr_0
    pixels = ((samples + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.savez(args.save_npz, arr_0=pixels)
    print(f"wrote {pixels.shape} uint8 to {args.save_npz}")
if not args.eval:
    raise SystemExit(0)

# -----------------------------------------------------------------------------
# --eval: how close are the samples to held-out images, next to the references that put the number
# in context. FD here is measured in the 128-d features of distance.py's evaluator CNN (trained on
# this dataset's training split, offline): it is not FID, and only comparable under the same evaluator.
from distance import evaluate, factor_scores, features, frechet_distance, get_evaluator, load_split  # noqa: E402

train_set, heldout_set, image_shape, _ = get_dataset(c["data"], c["data_dir"], c["image_size"], c["channels"],
                                                     c["download"], c.get("data_seed", 0))
heldout_images, _, heldout_factors = load_split(heldout_set)
evaluator, info = get_evaluator(args.out_dir, train_set, heldout_set, image_shape, ae_state["num_classes"],
                                c["data"], device, steps=args.eval_steps)
n = args.num_samples
# every row below is compared with the same held-out features, so the rows are comparable with each other
real_images = load_split(train_set, n)[0]  # N training images: the floor any generator could hope for
with torch.no_grad():
    # reconstructions of held-out images: the best the decoder can do, whatever the prior; FD above it is the prior's
    recons = decode(torch.cat([ae.encode(x.to(device))[0].float() for x in heldout_images.split(args.batch_size)]))
    # the trivial prior the DiT must beat: one Gaussian (mean, full covariance) fitted to the latents
    latents = load_checkpoint(os.path.join(args.out_dir, "latents.pt"), "latents",
                              f"python train_ae.py --stage 2 --out_dir {args.out_dir}")
    torch.manual_seed(args.seed)  # the posterior samples and the Gaussian's draws
    z = (latents["mean"] + latents["std"] * torch.randn_like(latents["std"])).flatten(1).double()  # (N, C*h*w)
    ridge = 1e-6 * torch.eye(z.shape[1], dtype=torch.float64)  # keeps the covariance positive definite
    gaussian = torch.distributions.MultivariateNormal(z.mean(0), torch.cov(z.T) + ridge)
    gaussian_images = decode(gaussian.sample((n,)).float().view(n, *latents["mean"].shape[1:]))
real_features = features(evaluator, heldout_images)
rows = {"DiT samples": samples, "Gaussian prior": gaussian_images, "reconstructions": recons, "real (train)": real_images}
scores = {}
for name, images in rows.items():
    feats = features(evaluator, images)
    # FD = ||mean_a - mean_b||^2 + a covariance term; the mean term alone moves when, e.g., one class is
    # drawn more often than the others, so it is reported too (the covariance term is the difference)
    scores[name] = {"fd": frechet_distance(feats, real_features), "count": len(images),
                    "fd_mean_term": (feats.mean(0) - real_features.mean(0)).double().pow(2).sum().item()}
    if heldout_factors.shape[1]:  # the built-in shapes: do the images have the factors real shapes have?
        scores[name].update(factor_scores(evaluator, images, heldout_factors))
metrics = {"fd": scores["DiT samples"]["fd"], "fd_gaussian": scores["Gaussian prior"]["fd"],
           "fd_recon": scores["reconstructions"]["fd"], "fd_real": scores["real (train)"]["fd"],
           "num_samples": n, "num_heldout": len(heldout_images), "heldout_psnr": ae_state.get("heldout_psnr"),
           "prior_loss": prior_state.get("loss"), "ae_stage": ae_state["stage"],
           "evaluator": {"network": "distance.Evaluator (4 convs + linear, 128-d features), trained offline here",
                         "accuracy": info["accuracy"], "factor_r2": info.get("factor_r2"), "steps": args.eval_steps},
           "sampler": {"sampler": args.sampler, "steps": args.steps, "eta": args.eta, "cfg_scale": args.cfg_scale,
                       "ema": not args.no_ema, "seed": args.seed}, "scores": scores}
print(f"\nFD in the evaluator's 128-d features (held-out accuracy {info['accuracy']:.3f}), "
      f"each row against the {len(heldout_images)} held-out images")
factor_cols = heldout_factors.shape[1] > 0
print(f"{'':18}{'images':>8}{'FD':>9}{'(means)':>9}" + (f"{'factorW1':>10}{'clean':>8}" if factor_cols else ""))
for name, row in scores.items():
    print(f"{name:18}{row['count']:>8}{row['fd']:>9.3f}{row['fd_mean_term']:>9.3f}"
          + (f"{row['factor_w1_mean']:>10.4f}{row['clean_share']:>8.3f}" if factor_cols else ""))
if num_classes:  # a conditional prior: does the evaluator see the class each sample was asked for?
    asked = torch.arange(n) % num_classes if args.class_label is None else torch.full((n,), args.class_label)
    seen = evaluate(evaluator, samples)[1].argmax(1)
    metrics["class_match"] = (seen == asked).float().mean().item()
    metrics["class_shares"] = (torch.bincount(seen, minlength=num_classes) / n).tolist()  # as the evaluator sees them
    print(f"the evaluator sees the requested class in {metrics['class_match']:.1%} of the DiT samples; "
          f"it sees the classes in the shares {', '.join(f'{share:.2f}' for share in metrics['class_shares'])}")
with open(os.path.join(args.out_dir, "metrics.json"), "w") as f:
    json.dump(metrics, f, indent=2)
print(f"wrote {os.path.join(args.out_dir, 'metrics.json')}")
