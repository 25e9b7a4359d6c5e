"""
Train the autoencoder, the Decoupled Autoencoder (DAE) way or the usual joint way.

  python train_ae.py --stage 1       # encoder + a deliberately weak auxiliary decoder
  python train_ae.py --stage 2       # frozen encoder + the full decoder, trained from scratch
  python train_ae.py --stage joint   # the baseline: encoder + full decoder together, same total steps

Stage 2 and joint both end by writing out/ae.pt (with the latent scale) and out/latents.pt, the
training set encoded once, which train_prior.py reads. On GPUs:
  python train_ae.py --stage 1 --data cifar10 --data_dir ~/data --batch_size 256
  torchrun --standalone --nproc_per_node=8 train_ae.py --stage 1 ...   # DDP, batch_size is per GPU

Why two stages (Hu et al., "Complexity Matters", NeurIPS 2023): the best latent for a generator of
limited complexity is the one that generator can most easily turn back into data. A weak decoder
can only reconstruct from a simple latent, so training the encoder against one (stage 1) pushes the
encoder toward a latent that is simple for the prior to model. The strong decoder of stage 2 then
buys back reconstruction detail without changing the latent.
"""
import argparse
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from data import (checksum, check_out_dir, fail, get_dataset, get_lr, load_checkpoint, make_loader, save_checkpoint,
                  precision, save_grid, setup_distributed)
from model import Autoencoder

# -----------------------------------------------------------------------------
# every knob is an option; the defaults train the built-in shapes on a laptop CPU in a few minutes
parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--stage", required=True, choices=["1", "2", "joint"], help="DAE stage 1, stage 2, or the joint baseline")
# data
parser.add_argument("--data", default="shapes", help="shapes (built in), mnist, cifar10 or folder")
parser.add_argument("--data_dir", default="data", help="where mnist/cifar10 files or the image folder are")
parser.add_argument("--download", action="store_true", help="let torchvision download mnist/cifar10 (opt in)")
parser.add_argument("--image_size", type=int, default=32, help="images are resized to this square size")
parser.add_argument("--channels", type=int, default=3, choices=[1, 3], help="channels for --data folder")
parser.add_argument("--data_seed", type=int, default=0, help="which shapes are drawn (and the folder split); --seed leaves it alone")
# the autoencoder (the defaults map 1x32x32 images to a 4x8x8 latent)
parser.add_argument("--ch", type=int, default=16, help="base width of encoder and decoder")
parser.add_argument("--ch_mult", default="1,2,4", help="width multiplier per level; each extra level halves the size")
parser.add_argument("--num_res_blocks", type=int, default=1, help="ResNet blocks per level")
parser.add_argument("--z_channels", type=int, default=4, help="latent channels")
parser.add_argument("--dropout", type=float, default=0.0, help="dropout in the encoder and the full decoder")
# the DAE's weak auxiliary decoder (stage 1 only). Mild dropout in a full-width decoder weakens it
# without starving it. In README.md's ablation (seed 0, sample FD, lower is better) dropout 0.2 gave
# 19.2, dropout 0.1 20.7, dropout 0.5 31.1, a thin decoder 23.8 (width 0.5) and 32.5 (width 0.25),
# and no weakening at all 25.2: so the default weakens by dropout, 0.2.
parser.add_argument("--aux_width", type=float, default=1.0, help="stage 1: width multiplier of the auxiliary decoder")
parser.add_argument("--aux_dropout", type=float, default=0.2, help="stage 1: dropout in the auxiliary decoder")
# the loss: reconstruction + kl_weight * KL (+ gan_weight * adversarial, off by default)
parser.add_argument("--recon_loss", default="l1", choices=["l1", "mse"], help="pixel reconstruction loss")
parser.add_argument("--kl_weight", type=float, default=1e-4, help="weight of KL(q(z|x) || N(0, I)) per latent element")
parser.add_argument("--gan_weight", type=float, default=0.0, help="weight of a patch-discriminator loss (0 = off)")
parser.add_argument("--gan_start", type=int, default=0, help="step at which the discriminator loss switches on")
# optimisation
parser.add_argument("--max_iters", type=int, default=None, help="steps (default: 500 for stage 1 and 2, 1000 joint)")
parser.add_argument("--batch_size", type=int, default=64, help="images per step per process")
parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
parser.add_argument("--min_lr", type=float, default=1e-4, help="learning rate at the end of the cosine decay")
parser.add_argument("--warmup_iters", type=int, default=50, help="linear warm-up steps")
parser.add_argument("--grad_clip", type=float, default=1.0, help="clip the gradient norm (0 = off)")
# system
parser.add_argument("--out_dir", default="out", help="where checkpoints, latents and pictures go")
parser.add_argument("--seed", type=int, default=0, help="seeds the model, the data order and every random draw")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1, mps")
parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile (default: on for cuda)")
parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                    help="compute precision, through autocast (default: bfloat16 on cuda, float32 elsewhere)")
parser.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes")
parser.add_argument("--log_interval", type=int, default=50, help="steps between log lines")
parser.add_argument("--ckpt_interval", type=int, default=250, help="steps between checkpoints")
parser.add_argument("--resume", action="store_true", help="continue this stage from its checkpoint")
args = parser.parse_args()
if args.max_iters is None:
    args.max_iters = 1000 if args.stage == "joint" else 500
for name in ("max_iters", "batch_size", "ch", "z_channels", "num_res_blocks", "log_interval", "ckpt_interval"):
    if getattr(args, name) <= 0:
        fail(f"--{name} must be positive, got {getattr(args, name)}")
if args.lr <= 0 or args.min_lr < 0 or args.kl_weight < 0 or args.gan_weight < 0:
    fail("--lr must be positive and --min_lr, --kl_weight, --gan_weight not negative")
if not (0 <= args.aux_dropout < 1 and 0 <= args.dropout < 1 and args.aux_width > 0):
    fail("dropouts must lie in [0, 1) and --aux_width must be positive")
try:  # "1,2,4" -> [1, 2, 4]: one entry per resolution level
    args.ch_mult = [int(m) for m in args.ch_mult.split(",")]
except ValueError:
    fail(f"--ch_mult takes comma-separated whole numbers such as 1,2,4, got '{args.ch_mult}'")
downsample = 2 ** (len(args.ch_mult) - 1)
if args.image_size % downsample:
    fail(f"--image_size {args.image_size} is not divisible by the downsampling factor {downsample} of --ch_mult")

# -----------------------------------------------------------------------------
# processes, devices, precision
rank, world_size, device = setup_distributed(args.device)
master_process = rank == 0  # only rank 0 prints and writes files
check_out_dir(args.out_dir, master_process)
device_type = "cuda" if device.startswith("cuda") else "cpu"
args.dtype, autocast = precision(device, args.dtype)  # bf16 autocast on GPUs, float32 on cpu unless asked

train_set, heldout_set, image_shape, num_classes = get_dataset(args.data, args.data_dir, args.image_size,
                                                               args.channels, args.download, args.data_seed)
final_stage = args.stage != "1"  # stage 2 and joint both produce the autoencoder the prior uses
ckpt_path = os.path.join(args.out_dir, "ae.pt" if final_stage else "ae_stage1.pt")
ARCH = ["data", "data_seed", "image_size", "channels", "ch", "ch_mult", "num_res_blocks", "z_channels"]


def check_same_arch(config, path):
    """A checkpoint only fits when it was made for the same data and the same architecture."""
    for key in ARCH:
        if config.get(key) != getattr(args, key):
            fail(f"{path} was trained with --{key} {config.get(key)}, this run asks for {getattr(args, key)}: "
                 f"use the same value or another --out_dir")


# -----------------------------------------------------------------------------
# the model for this stage
torch.manual_seed(args.seed)  # the same initial weights on every rank
arch = dict(img_channels=image_shape[0], ch=args.ch, ch_mult=args.ch_mult, num_res_blocks=args.num_res_blocks,
            z_channels=args.z_channels, dropout=args.dropout)
if args.stage == "1":
    # the auxiliary decoder: thinner (aux_width) and/or noisier (aux_dropout) than the real one, so
    # the encoder must find a latent that a low-complexity generator can decode
    model = Autoencoder(**arch, dec_width=args.aux_width, dec_dropout=args.aux_dropout)
else:
    model = Autoencoder(**arch, dec_width=1.0, dec_dropout=args.dropout)
if args.stage == "2" and not args.resume:
    stage1_path = os.path.join(args.out_dir, "ae_stage1.pt")
    stage1 = load_checkpoint(stage1_path, "autoencoder", f"python train_ae.py --stage 1 --out_dir {args.out_dir}")
    check_same_arch(stage1["config"], stage1_path)
    # keep the encoder half of stage 1 (encoder + quant_conv); the new decoder starts from scratch
    encoder_half = {k: v for k, v in stage1["model"].items() if k.startswith(("encoder.", "quant_conv."))}
    model.load_state_dict(encoder_half, strict=False)
if args.stage == "2":
    model.freeze_encoder()  # DAE stage 2: the latent no longer changes
model.to(device)

# optional adversarial loss: a small patch discriminator that scores overlapping patches as real/fake
discriminator = None
if args.gan_weight > 0:
    c, w = image_shape[0], args.ch * 2
    discriminator = nn.Sequential(
        nn.Conv2d(c, w, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(w, 2 * w, 4, 2, 1), nn.GroupNorm(32, 2 * w),
        nn.LeakyReLU(0.2), nn.Conv2d(2 * w, 1, 3, 1, 1)).to(device)  # (N, 1, H/4, W/4) patch scores

# only what this stage trains goes to the optimizer: in stage 2 the frozen encoder gets no moments
# (and no weight updates), so the latent the prior will see stays exactly the stage-1 latent
trainable = [p for p in model.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(trainable, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
opt_disc = torch.optim.AdamW(discriminator.parameters(), lr=args.lr, betas=(0.5, 0.9)) if discriminator else None

start_step = 0
if args.resume:
    state = load_checkpoint(ckpt_path, "autoencoder", f"python train_ae.py --stage {args.stage} --out_dir {args.out_dir}")
    if state["stage"] != args.stage:
        fail(f"{ckpt_path} holds stage {state['stage']}, not stage {args.stage}: resume with --stage {state['stage']}")
    check_same_arch(state["config"], ckpt_path)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if discriminator is not None:
        if "discriminator" not in state:
            fail(f"{ckpt_path} was trained without --gan_weight: resume without it")
        discriminator.load_state_dict(state["discriminator"])
        opt_disc.load_state_dict(state["opt_disc"])
    start_step = state["step"]
    if master_process:
        print(f"resuming stage {args.stage} from step {start_step}")

n_params = sum(p.numel() for p in model.decoder.parameters())
if master_process:
    print(f"stage {args.stage}: encoder {sum(p.numel() for p in model.encoder.parameters()) / 1e6:.2f}M params, "
          f"decoder {n_params / 1e6:.2f}M params, {len(trainable)} trainable tensors")
raw_model = model  # checkpoints save this one: no "_orig_mod." (compile) or "module." (DDP) prefixes
if world_size > 1:  # DDP also broadcasts rank 0's weights when it wraps; the seed alone already makes them equal
    print(f"rank {rank}: initial checksum {checksum(raw_model)!r}")
if args.compile if args.compile is not None else device_type == "cuda":
    if master_process:
        print("compiling the model... (takes a ~minute)")
    model = torch.compile(model)
if world_size > 1:
    model = DDP(model, device_ids=[int(device.split(":")[1])] if device_type == "cuda" else None)
    if discriminator is not None:
        discriminator = DDP(discriminator, device_ids=[int(device.split(":")[1])] if device_type == "cuda" else None)


def checkpoint(step):
    """Everything needed to continue exactly: weights, optimizer moments, step, config. The random
    draws of step s are seeded from (seed, rank, s), so the step also restores every random stream."""
    state = {"kind": "autoencoder", "stage": args.stage, "step": step, "config": vars(args),
             "image_shape": list(image_shape), "num_classes": num_classes,
             "model": raw_model.state_dict(), "optimizer": optimizer.state_dict()}
    if discriminator is not None:
        state["discriminator"] = getattr(discriminator, "module", discriminator).state_dict()
        state["opt_disc"] = opt_disc.state_dict()
    return state


def recon_loss(x, recon):
    # L1 (the default) keeps edges sharper than MSE, which averages a blurry edge into a cheap compromise
    return (x - recon).abs().mean() if args.recon_loss == "l1" else F.mse_loss(recon, x)


# -----------------------------------------------------------------------------
# the training loop
loader = make_loader(train_set, args.batch_size, args.seed, start_step, args.max_iters, rank, world_size, args.num_workers)
if master_process:
    print(f"global batch {args.batch_size * world_size} ({world_size} process(es) x {args.batch_size}), "
          f"steps {start_step} -> {args.max_iters}")
model.train()
step, t0, loss_sum, logged = start_step, time.time(), torch.zeros(3, device=device), 0
local_loss = float("nan")  # this rank's loss over the last log interval
try:
    for x, _, _ in loader:
        # every random draw of this step (posterior noise, dropout) comes from (seed, rank, step)
        torch.manual_seed(args.seed * 1_000_003 + rank * 7919 + step)
        lr = get_lr(step, args.lr, args.warmup_iters, args.max_iters, args.min_lr)
        for group in optimizer.param_groups + (opt_disc.param_groups if opt_disc else []):
            group["lr"] = lr
        x = x.to(device, non_blocking=True)
        with autocast:
            # model(x) encodes, draws z = mean + std * noise (the reparameterisation trick, so the
            # gradient reaches the encoder) and decodes; kl is the mean KL per latent element
            recon, kl = model(x)
            rec = recon_loss(x, recon.float())
            loss = rec + args.kl_weight * kl
            use_gan = discriminator is not None and step >= args.gan_start
            if use_gan:  # the generator wants the discriminator to call its reconstructions real
                loss = loss - args.gan_weight * discriminator(recon).float().mean()
        if not torch.isfinite(loss):
            fail(f"loss became {loss.item()} at step {step}; the last good checkpoint is kept at {ckpt_path}: "
                 f"lower --lr (now {args.lr}) and resume with --resume")
        loss.backward()
        if args.grad_clip > 0:  # a rare huge gradient early in training (lr near its peak) must not wreck the weights
            torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if use_gan:  # hinge loss: push real patches above +1 and reconstructions below -1
            with autocast:
                d_loss = (F.relu(1 - discriminator(x)).mean() + F.relu(1 + discriminator(recon.detach())).mean())
            d_loss.backward()
            opt_disc.step()
            opt_disc.zero_grad(set_to_none=True)
        step += 1
        loss_sum += torch.stack([loss.detach().float(), rec.detach().float(), kl.detach().float()])
        logged += 1
        if step % args.log_interval == 0 or step == args.max_iters:
            local_loss = (loss_sum[0] / logged).item()  # this rank's own share, kept for the checksum line
            if world_size > 1:  # log the mean over all processes, not rank 0's share (SUM: every backend has it)
                torch.distributed.all_reduce(loss_sum, op=torch.distributed.ReduceOp.SUM)
                loss_sum /= world_size
            elapsed = time.time() - t0
            if master_process:
                total, rec_avg, kl_avg = (loss_sum / logged).tolist()
                rate = logged * args.batch_size * world_size / elapsed
                print(f"step {step}/{args.max_iters} | loss {total:.4f} (recon {rec_avg:.4f}, kl {kl_avg:.3f}) | "
                      f"lr {lr:.1e} | {rate:.0f} img/s | {(args.max_iters - step) * elapsed / logged:.0f}s left")
            t0, loss_sum, logged = time.time(), torch.zeros(3, device=device), 0
        if master_process and (step % args.ckpt_interval == 0 or step == args.max_iters):
            save_checkpoint(checkpoint(step), ckpt_path)
except KeyboardInterrupt:  # Ctrl-C: keep the finished steps, then say how to continue
    if master_process:
        save_checkpoint(checkpoint(step), ckpt_path)
        print(f"\ninterrupted: saved step {step} to {ckpt_path}; continue with the same command plus --resume")
    raise SystemExit(130)

# -----------------------------------------------------------------------------
# after training: measure on the held-out set, and for the final autoencoder cache the latents
if world_size > 1:  # every rank must end with the same weights: print a checksum to compare (tests read it)
    print(f"rank {rank}: parameter checksum {checksum(raw_model)!r} | own loss {local_loss:.6f}")
    torch.distributed.barrier()  # leave together: gloo aborts a rank whose peer has already hung up
    torch.distributed.destroy_process_group()
if not master_process:
    raise SystemExit(0)
raw_model.eval()


@torch.no_grad()
def encode_all(dataset):
    """Posterior mean and std of every image, plus labels, in dataset order (no shuffling, no flips)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=256, num_workers=args.num_workers)
    means, stds, labels = [], [], []
    for x, y, _ in loader:
        with autocast:
            mean, std = raw_model.encode(x.to(device))
        means.append(mean.float().cpu())
        stds.append(std.float().cpu())
        labels.append(y)
    return torch.cat(means), torch.cat(stds), torch.cat(labels)


with torch.no_grad():
    mean, std, _ = encode_all(heldout_set)
    images = torch.stack([heldout_set[i][0] for i in range(len(heldout_set))])
    recons = torch.cat([raw_model.decode(m.to(device)).float().cpu() for m in mean.split(256)])
    # PSNR from the posterior mean (no sampling noise), so two runs compare the decoders, not the dice
    mse = ((recons.clamp(-1, 1) - images) / 2).pow(2).flatten(1).mean(1)  # per image, on a [0, 1] scale
    psnr = (10 * torch.log10(1 / mse.clamp_min(1e-10))).mean().item()
    pairs = torch.stack([images[:32], recons[:32]], dim=1).flatten(0, 1)  # original, reconstruction, ...
    grid_path = os.path.join(args.out_dir, "recon.png" if final_stage else "recon_stage1.png")
    save_grid(pairs, grid_path, nrow=8)
state = checkpoint(step)
state["heldout_psnr"] = psnr
print(f"held-out reconstruction PSNR {psnr:.2f} dB (decoding the posterior mean); grid in {grid_path}")
if final_stage:
    mean, std, labels = encode_all(train_set)
    # scale latents to unit variance for the prior (latent diffusion's "scale factor"); the variance of
    # a posterior sample z = mean + std * noise is Var(mean) + E[std^2]
    latent_scale = 1.0 / (mean.var() + std.pow(2).mean()).sqrt().item()
    state["latent_scale"] = latent_scale
    latents = {"kind": "latents", "mean": mean, "std": std, "labels": labels, "latent_scale": latent_scale,
               "num_classes": num_classes, "ae_stage": args.stage}
    save_checkpoint(latents, os.path.join(args.out_dir, "latents.pt"))
    print(f"latent scale {latent_scale:.4f}; wrote {len(labels)} latents of shape {tuple(mean.shape[1:])} "
          f"to {os.path.join(args.out_dir, 'latents.pt')}")
save_checkpoint(state, ckpt_path)
