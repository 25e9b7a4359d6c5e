"""
Train the latent prior: a small Diffusion Transformer (DiT) on the latents cached by train_ae.py.

  python train_prior.py                  # cpu or one GPU, reads out/latents.pt
  torchrun --standalone --nproc_per_node=8 train_prior.py --batch_size 256   # 8 GPUs (DDP)

The prior is where the choice of latent pays off: the DAE latent is meant to be simpler to
model, so the same DiT, trained for the same steps, should give better samples on it.
Training is DDPM's Algorithm 1 (GaussianDiffusion.training_loss in model.py) with AdamW,
warm-up + cosine learning rate, gradient clipping and accumulation, and an EMA of the weights,
which is what sample.py uses by default.
"""
import argparse
import contextlib
import copy
import math
import os
import shutil

import torch
from torch.optim.swa_utils import get_ema_multi_avg_fn

from data import StepSampler, load_autoencoder, load_checkpoint, save_checkpoint, step_seed
from model import DiT, GaussianDiffusion
from plumbing import (FiniteGuard, HelpFormatter, TrainLog, add_run_options, check_out_dir, command,
                      fail, finish_distributed, get_lr, initial_checksum,
                      int_list, non_negative, positive_float, positive_int, precision, probability,
                      save_grid, setup_distributed, stop_on_interrupt, unit_interval, wrap_model)

# -----------------------------------------------------------------------------
# every knob is an option; the defaults train a tiny DiT on the built-in shapes on a 2-core CPU
# in minutes. What the prior needs most here is optimizer steps (assets/RESULTS.md, "How does
# sample quality grow with the prior's training?"), so the defaults spend the time on steps
parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
parser.add_argument("--out_dir", default="out",
                    help="reads latents.pt (and ae.pt for pictures) here, writes prior.pt")
# the DiT (the original's DiT-S is hidden 384, depth 12, 6 heads; ours is smaller for a CPU)
parser.add_argument("--hidden_size", type=positive_int, default=128, help="transformer width")
parser.add_argument("--depth", type=positive_int, default=4, help="number of DiT blocks")
parser.add_argument("--num_heads", type=positive_int, default=4, help="attention heads")
parser.add_argument("--patch_size", type=positive_int, default=2,
                    help="latent patch side; an 8x8 latent gives 16 tokens at 2")
parser.add_argument("--mlp_ratio", type=positive_float, default=4.0,
                    help="MLP width / transformer width")
parser.add_argument("--class_dropout_prob", type=probability, default=0.1,
                    help="label dropout, which trains the 'no class' mode that guidance needs")
parser.add_argument("--unconditional", action="store_true", help="ignore the class labels")
# optimisation (nanoGPT's recipe: AdamW, linear warm-up, cosine decay to min_lr, clipping)
parser.add_argument("--max_iters", type=positive_int, default=15_000, help="optimizer steps")
parser.add_argument("--batch_size", type=positive_int, default=64,
                    help="latents per micro-batch per process")
parser.add_argument("--grad_accum", type=positive_int, default=1,
                    help="micro-batches accumulated per optimizer step")
parser.add_argument("--lr", type=positive_float, default=1e-3, help="peak learning rate")
parser.add_argument("--min_lr", type=non_negative, default=5e-5,
                    help="learning rate at the end of the cosine decay")
parser.add_argument("--warmup_iters", type=int, default=100, help="linear warm-up steps")
parser.add_argument("--weight_decay", type=non_negative, default=0.0, help="AdamW weight decay")
parser.add_argument("--grad_clip", type=non_negative, default=1.0,
                    help="clip the gradient norm (0 = off)")
parser.add_argument("--ema_decay", type=probability, default=0.999,
                    help="EMA decay (warmed up as min(decay, (1 + s) / (10 + s)))")
# system: device, compilation, how often to log, save and draw samples
add_run_options(parser, log_interval=250, ckpt_interval=1000, fast_cpu_default=True)
parser.add_argument("--sample_interval", type=int, default=2500,
                    help="steps between sample grids (0 = only at the end)")
# autoguidance (sample.py) guides the prior with an early, weaker version of itself, kept for free
parser.add_argument("--guide_at", type=unit_interval, default=0.2,
                    help="keep the weights at this share of the run as out_dir/prior_guide.pt, the "
                         "weaker prior sample.py guides with (0 = none)")
parser.add_argument("--snapshots", type=int_list, default=[],
                    help="more steps at which to keep a copy, out_dir/prior_step<S>.pt")
args = parser.parse_args()
if args.hidden_size % args.num_heads:
    fail(f"--hidden_size {args.hidden_size} must be divisible by --num_heads {args.num_heads}")


def fast_bf16_cpu():
    """Does this CPU have bf16 matrix units (Intel AMX, or AVX512-BF16) and a C++ compiler for
    torch.compile? There the DiT trains about twice as fast in bf16 autocast, compiled (the speed
    section of assets/RESULTS.md), so this script turns both on by default, as on a GPU."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:  # not Linux: no way to tell, so float32
        return False
    has_units = " amx_bf16" in flags or " avx512_bf16" in flags
    return has_units and shutil.which("c++") is not None


# -----------------------------------------------------------------------------
# one process per device; under torchrun every process runs this same file with its own RANK
rank, world_size, device = setup_distributed(args.device)  # also checks that --device exists
master_process = rank == 0  # only rank 0 prints and writes files
check_out_dir(args.out_dir, master_process)
device_type = "cuda" if device.startswith("cuda") else "cpu"
# bf16 autocast and torch.compile on GPUs and on CPUs with bf16 matrix units (see fast_bf16_cpu)
fast_cpu = device_type == "cpu" and fast_bf16_cpu()
args.dtype, autocast = precision(device, args.dtype, fast_cpu)
if fast_cpu and master_process and args.dtype == "bfloat16":
    print("this cpu has bf16 matrix units: bf16 autocast and torch.compile "
          "(--dtype float32 --no-compile for neither)")

# the latents: posterior means and stds of the whole training set, written once by train_ae.py
make_latents = (command("train_ae.py", "--stage", "1", "--out_dir", args.out_dir) + " && "
                + command("train_ae.py", "--stage", "2", "--out_dir", args.out_dir))
latents = load_checkpoint(os.path.join(args.out_dir, "latents.pt"), "latents", make_latents)
latent_mean = latents["mean"].to(device)
latent_std = latents["std"].to(device)
labels = latents["labels"].to(device)
latent_scale = latents["latent_scale"]
latent_shape = tuple(latent_mean.shape[1:])  # (C, h, w), (4, 8, 8) by default
# a dataset of one class (a flat image folder) has no labels to condition on: unconditional
num_classes = 0 if args.unconditional or latents["num_classes"] <= 1 else latents["num_classes"]
if num_classes == 0 and not args.unconditional and master_process:
    print(f"the latents hold {latents['num_classes']} class: training an unconditional prior")
if latent_shape[1] != latent_shape[2] or latent_shape[1] % args.patch_size:
    fail(f"latents of shape {latent_shape} need to be square with a side divisible by "
         f"--patch_size {args.patch_size}")

# -----------------------------------------------------------------------------
# the model, its EMA copy, the diffusion schedule and the optimizer
torch.manual_seed(args.seed)  # the same initial weights on every rank (DDP broadcasts rank 0's)
# learn_sigma=False: we train only the noise (the simple loss); DDIM needs no learned variance
dit_config = dict(input_size=latent_shape[1], patch_size=args.patch_size,
                  in_channels=latent_shape[0], hidden_size=args.hidden_size, depth=args.depth,
                  num_heads=args.num_heads, mlp_ratio=args.mlp_ratio,
                  class_dropout_prob=args.class_dropout_prob, num_classes=num_classes,
                  learn_sigma=False)
model = DiT(**dit_config).to(device)
ema = copy.deepcopy(model).requires_grad_(False)  # the averaged weights that sample well
diffusion = GaussianDiffusion().to(device)
# fused AdamW does the whole update in one kernel per device (on a cpu too)
optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99),
                              weight_decay=args.weight_decay, fused=device_type in ("cuda", "cpu"))
start_step = 0
ckpt_path = os.path.join(args.out_dir, "prior.pt")
if args.resume:  # continue exactly: weights, EMA, optimizer moments and the step
    state = load_checkpoint(ckpt_path, "prior", command("train_prior.py", "--out_dir", args.out_dir))
    if state["dit_config"] != dit_config:
        fail(f"{ckpt_path} holds a DiT with {state['dit_config']}, this run asks for "
             f"{dit_config}: use the same options")
    if state.get("latents_fingerprint") != latents.get("fingerprint"):
        fail(f"{ckpt_path} was trained on other latents than {args.out_dir}/latents.pt (a new "
             f"autoencoder?): start a new prior without --resume, or in another --out_dir")
    model.load_state_dict(state["model"])
    ema.load_state_dict(state["ema"])
    optimizer.load_state_dict(state["optimizer"])
    start_step = state["step"]

# the autoencoder, only to turn sample grids into pictures along the way (optional here)
ae_path, ae = os.path.join(args.out_dir, "ae.pt"), None
if master_process and os.path.isfile(ae_path):
    ae = load_autoencoder(ae_path, make_latents, device)[0]

n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
tokens = (latent_shape[1] // args.patch_size) ** 2
if master_process:
    print(f"DiT: {n_params / 1e6:.2f}M parameters, {tokens} tokens, {num_classes} classes; "
          f"latents {latent_shape} x {len(labels)}, scale {latent_scale:.4f}")
raw_model = model  # checkpoints save the plain module, never the compiled or DDP wrapper
initial_checksum(raw_model, rank, world_size)
model = wrap_model(model, args.compile, device, world_size, master_process, fast_cpu)
guard = FiniteGuard(device, world_size, ckpt_path, args.lr)


def checkpoint(step):
    """Model, EMA, optimizer moments, step and config: everything to continue exactly. The data
    order and the random draws of step s are functions of (seed, rank, s): the step restores them."""
    return {"kind": "prior", "step": step, "config": vars(args), "dit_config": dit_config,
            "latent_shape": list(latent_shape), "latent_scale": latent_scale,
            "num_classes": num_classes, "model": raw_model.state_dict(), "ema": ema.state_dict(),
            "optimizer": optimizer.state_dict(), "latents_fingerprint": latents.get("fingerprint"),
            "loss": log.means["loss"]}  # the last logged loss


@torch.no_grad()
def sample_grid(step):
    """16 DDIM samples from the EMA model with a fixed seed, decoded, so grids compare over time."""
    if ae is None:
        return
    g = torch.Generator(device=device).manual_seed(1234)
    y = torch.arange(16, device=device) % max(num_classes, 1)  # all 0 when unconditional
    noise = torch.randn((16,) + latent_shape, generator=g, device=device)
    z = diffusion.ddim_sample(ema.eval(), noise, y, steps=25, null_label=num_classes, generator=g)
    path = os.path.join(args.out_dir, "prior_samples.png")
    save_grid(ae.decode(z / latent_scale).float(), path, nrow=8)
    print(f"step {step}: wrote {path}")


# bf16 dense tensor-core peaks (FLOP/s) for the log line's MFU; other GPUs get TFLOP/s instead
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12,
                   "L40S": 362e12, "L4": 121e12, "A10": 125e12}


def gpu_peak_flops(device):
    """The bf16 peak of this GPU if it is in the table above, else None."""
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def flops_per_latent():
    """Training FLOPs of one latent, 3 x the forward's (2 per multiply-add): the weights that act
    on every token, the ones that act once per latent (the timestep MLP, adaLN), and attention's
    scores (q k^T and its product with v). The label lookup and pos_embed cost no FLOPs."""
    per_latent, per_token = 0, 0
    for name, p in raw_model.named_parameters():
        if "adaLN_modulation" in name or name.startswith("t_embedder"):
            per_latent += p.numel()
        elif p.requires_grad and not name.startswith("y_embedder"):
            per_token += p.numel()
    attention_scores = 2 * 2 * args.depth * args.hidden_size * tokens ** 2
    return 3 * (2 * per_token * tokens + 2 * per_latent + attention_scores)


# -----------------------------------------------------------------------------
# the training loop: every rank takes its own piece of each global batch (see data.StepSampler)
micro = args.batch_size
global_batch = args.batch_size * args.grad_accum * world_size
sampler = StepSampler(len(labels), micro * args.grad_accum, args.seed, start_step, args.max_iters,
                      rank, world_size)
if master_process:
    print(f"global batch {global_batch} = {world_size} process(es) x {args.grad_accum} "
          f"accumulation x {micro}; steps {start_step} -> {args.max_iters}")
peak_flops = gpu_peak_flops(device) if device_type == "cuda" else None
log = TrainLog(args.out_dir, "prior", ["loss"], args.log_interval, args.max_iters, global_batch,
               "latents", world_size, master_process,
               flops_per_latent() if device_type == "cuda" else None, peak_flops)
if args.resume:
    log.means["loss"] = state.get("loss", math.nan)  # what the checkpoint says until the next log
model.train()  # important! label dropout on: it trains the "no class" mode that guidance needs
model_params, ema_params = list(raw_model.parameters()), list(ema.parameters())
guide_step = round(args.guide_at * args.max_iters) if args.guide_at > 0 else None
step = start_step
try:
    for idx in sampler:
        torch.manual_seed(step_seed(args.seed, rank, step))  # this step's draws
        lr = get_lr(step, args.lr, args.warmup_iters, args.max_iters, args.min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # the batch's indices, copied from pinned memory without making the host wait
        idx = torch.tensor(idx, pin_memory=device_type == "cuda").to(device, non_blocking=True)
        # a fresh posterior sample each time, scaled to unit variance: z = (mean + std noise) scale
        # (the decoder was trained on such samples, so the prior should model them too)
        x0 = (latent_mean[idx] + latent_std[idx] * torch.randn_like(latent_std[idx])) * latent_scale
        y = labels[idx] if num_classes else torch.zeros_like(labels[idx])
        # DDPM's draws for the whole step at once, so accumulating micro-batches changes nothing
        t = torch.randint(0, diffusion.num_timesteps, (len(x0),), device=device)
        noise = torch.randn_like(x0)
        step_loss = torch.zeros((), device=device)
        for k in range(args.grad_accum):
            part = slice(k * micro, (k + 1) * micro)
            last = k == args.grad_accum - 1  # DDP averages gradients across ranks on the last only
            with model.no_sync() if world_size > 1 and not last else contextlib.nullcontext():
                with autocast():
                    loss = diffusion.training_loss(model, x0[part], y[part], t[part], noise[part])
                    loss = loss / args.grad_accum
                loss.backward()
            step_loss += loss.detach().float()
        # clipping (a rare huge gradient, a t near 0 with a bad draw, must not wreck the weights)
        # also measures the norm; a non-finite step never reaches the weights or the EMA
        max_norm = args.grad_clip if args.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(model_params, max_norm, foreach=True)
        guard.check(step_loss, grad_norm, model_params, step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # EMA with warm-up: early on the average follows the weights closely, so short runs
        # sample well; one multi-tensor update for all the weights
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        get_ema_multi_avg_fn(decay)(ema_params, model_params, None)
        step += 1

        log.add(step_loss)
        save_now = step % args.ckpt_interval == 0 or step == args.max_iters
        log.after_step(step, lr, guard, save_now)  # stops the run if any step was not finite
        if master_process and save_now:
            save_checkpoint(checkpoint(step), ckpt_path)
        copies = []  # the weaker prior for autoguidance, and any --snapshots
        if step == guide_step:
            copies.append("prior_guide.pt")
        if step in args.snapshots:
            copies.append(f"prior_step{step}.pt")
        if master_process and copies:
            guard.verify()  # (a copy, like a checkpoint, holds only finite steps)
            for name in copies:
                save_checkpoint(checkpoint(step), os.path.join(args.out_dir, name))
        if master_process and args.sample_interval and step % args.sample_interval == 0 \
                and step != args.max_iters:
            sample_grid(step)
except KeyboardInterrupt:  # Ctrl-C: keep the finished steps, then say how to continue
    stop_on_interrupt(step, guard, master_process, lambda: save_checkpoint(checkpoint(step), ckpt_path),
                      ckpt_path)
if master_process:  # a last grid from the final EMA weights
    sample_grid(step)
finish_distributed(raw_model, rank, world_size, log.local_loss)  # every rank, the same weights
