"""
Sample images: noise -> DiT prior (DDIM or DDPM) -> latent -> autoencoder decoder -> picture.

  python sample.py                                  # 64 samples, DDIM 50 steps, EMA weights -> out/samples.png
  python sample.py --class_label 2 --cfg_scale 3    # only triangles, with classifier-free guidance
  python sample.py --sampler ddpm --steps 1000      # the ancestral sampler, all 1000 steps

It reads out/ae.pt (train_ae.py) and out/prior.pt (train_prior.py) and runs on cpu or cuda.
"""
import argparse
import contextlib
import os
import time

import torch

from data import check_out_dir, fail, load_checkpoint, save_grid
from model import Autoencoder, DiT, GaussianDiffusion

# -----------------------------------------------------------------------------
parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--out_dir", default="out", help="where ae.pt and prior.pt are, and where pictures go")
parser.add_argument("--output", default=None, help="the PNG grid to write (default: out_dir/samples.png)")
parser.add_argument("--num_samples", type=int, default=64, help="how many images")
parser.add_argument("--batch_size", type=int, default=256, help="images sampled at once")
parser.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm"], help="DDIM (few steps) or ancestral DDPM")
parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: 50 for DDIM; DDPM uses all 1000)")
parser.add_argument("--eta", type=float, default=0.0, help="DDIM noise: 0 deterministic, 1 stochastic like DDPM")
parser.add_argument("--cfg_scale", type=float, default=1.0, help="classifier-free guidance scale (1 = off)")
parser.add_argument("--class_label", type=int, default=None, help="sample only this class (default: cycle through all)")
parser.add_argument("--no_ema", action="store_true", help="use the raw prior weights instead of their EMA")
parser.add_argument("--seed", type=int, default=0, help="seeds the starting noise")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, mps")
args = parser.parse_args()
if args.num_samples <= 0 or args.batch_size <= 0:
    fail("--num_samples and --batch_size must be positive")
if args.cfg_scale < 0:
    fail(f"--cfg_scale must be 0 or more (1 = no guidance), got {args.cfg_scale}")
if args.steps is None:
    args.steps = 50 if args.sampler == "ddim" else 1000
if not 1 <= args.steps <= 1000:
    fail(f"--steps must be between 1 and the 1000 training steps, got {args.steps}")
if args.sampler == "ddpm" and args.steps != 1000:
    fail("the DDPM sampler walks all 1000 steps: drop --steps, or use --sampler ddim for fewer")
check_out_dir(args.out_dir, True)
output = args.output or os.path.join(args.out_dir, "samples.png")
device = args.device
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
if prior_state["latent_shape"] != [c["z_channels"], side, side] or prior_state["latent_scale"] != ae_state["latent_scale"]:
    fail(f"prior.pt was trained on latents of shape {prior_state['latent_shape']} (scale {prior_state['latent_scale']:.4f}), "
         f"not on this autoencoder's {[c['z_channels'], side, side]} (scale {ae_state['latent_scale']:.4f}): "
         f"retrain with python train_prior.py --out_dir {args.out_dir}")
prior = DiT(**prior_state["dit_config"])
prior.load_state_dict(prior_state["model" if args.no_ema else "ema"])
prior.to(device).eval()  # important! eval mode: no label dropout, the labels we pass are the labels used
num_classes, latent_scale = prior_state["num_classes"], prior_state["latent_scale"]
if num_classes == 0 and (args.cfg_scale != 1.0 or args.class_label is not None):
    fail("this prior is unconditional: drop --cfg_scale and --class_label, or train without --unconditional")
if args.class_label is not None and not 0 <= args.class_label < num_classes:
    fail(f"--class_label {args.class_label} is out of range: this prior knows classes 0..{num_classes - 1}")
diffusion = GaussianDiffusion().to(device)


@torch.no_grad()
def generate(n, seed):
    """n decoded samples in [-1, 1]: the same seed always gives the same images."""
    g = torch.Generator(device=device).manual_seed(seed)
    images = []
    for start in range(0, n, args.batch_size):
        b = min(args.batch_size, n - start)
        if num_classes == 0:
            y = torch.zeros(b, dtype=torch.long, device=device)
        elif args.class_label is not None:
            y = torch.full((b,), args.class_label, device=device)
        else:  # cycle through the classes, so a grid shows each of them
            y = (torch.arange(start, start + b, device=device) % num_classes)
        noise = torch.randn((b, *prior_state["latent_shape"]), generator=g, device=device)
        with autocast:
            if args.sampler == "ddim":
                z = diffusion.ddim_sample(prior, noise, y, args.steps, args.eta, args.cfg_scale, num_classes, g)
            else:
                z = diffusion.ddpm_sample(prior, noise, y, args.cfg_scale, num_classes, g)
            images.append(ae.decode(z.float() / latent_scale).float().clamp(-1, 1).cpu())  # undo the unit-variance scaling
    return torch.cat(images)


t0 = time.time()
samples = generate(args.num_samples, args.seed)
elapsed = time.time() - t0
save_grid(samples, output, nrow=8)
print(f"wrote {len(samples)} samples ({args.sampler}, {args.steps} steps, cfg {args.cfg_scale}) to {output} "
      f"in {elapsed:.1f}s, {len(samples) / elapsed:.1f} images/s")
