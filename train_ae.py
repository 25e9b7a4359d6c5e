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
import math
import os

import torch
import torch.nn.functional as F

from data import get_dataset, make_loader
from model import Autoencoder, PatchDiscriminator
from plumbing import (HelpFormatter, TrainLog, add_run_options, average_gradients, check_out_dir, check_step_is_finite,
                      command, fail, finish_distributed, fingerprint, get_lr, initial_checksum, load_checkpoint,
                      precision, resume_command, save_checkpoint, save_grid, setup_distributed, step_seed, wrap_model)

# -----------------------------------------------------------------------------
# every knob is an option; the defaults train the built-in shapes on a laptop CPU in a few minutes.
# The data and architecture options (marked *) default to the stage-1 checkpoint's values in stage 2,
# and to the checkpoint's own with --resume: they must match it, so they need not be repeated.
parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
parser.add_argument("--stage", required=True, choices=["1", "2", "joint"], help="DAE stage 1, stage 2, or the joint baseline")
# data
parser.add_argument("--data", choices=["shapes", "mnist", "cifar10", "folder"], help="* the dataset (default: shapes)")
parser.add_argument("--data_dir", help="* where mnist/cifar10 files or the image folder are (default: data)")
parser.add_argument("--download", action="store_true", help="let torchvision download mnist/cifar10 (opt in)")
parser.add_argument("--image_size", type=int, help="* images are resized to this square size (default: 32)")
parser.add_argument("--channels", type=int, choices=[1, 3], help="* channels for --data folder (default: 3)")
parser.add_argument("--data_seed", type=int, help="* which shapes are drawn, and the folder split (default: 0)")
# the autoencoder (the defaults map 1x32x32 images to a 4x8x8 latent)
parser.add_argument("--ch", type=int, help="* base width of encoder and decoder (default: 16)")
parser.add_argument("--ch_mult", help="* width multiplier per level; each extra level halves the size (default: 1,2,4)")
parser.add_argument("--num_res_blocks", type=int, help="* ResNet blocks per level (default: 1)")
parser.add_argument("--z_channels", type=int, help="* latent channels (default: 4)")
parser.add_argument("--dropout", type=float, default=0.0, help="dropout in the encoder and the full decoder")
# the DAE's weak auxiliary decoder (stage 1 only). Mild dropout in a full-width decoder weakens it
# without starving it; thinner decoders and stronger dropout gave worse samples (README, "Results")
parser.add_argument("--aux_width", type=float, default=1.0, help="stage 1: width multiplier of the auxiliary decoder")
parser.add_argument("--aux_dropout", type=float, default=0.2, help="stage 1: dropout in the auxiliary decoder")
# the loss: reconstruction + kl_weight * KL (+ gan_weight * adversarial, off by default)
parser.add_argument("--recon_loss", default="l1", choices=["l1", "mse"], help="pixel reconstruction loss")
parser.add_argument("--kl_weight", type=float, default=1e-4, help="weight of KL(q(z|x) || N(0, I)) per latent element")
parser.add_argument("--gan_weight", type=float, default=0.0, help="weight of VQGAN's patch-discriminator loss (0 = off)")
parser.add_argument("--gan_start", type=int, default=0, help="step at which the discriminator loss switches on")
# optimisation
parser.add_argument("--max_iters", type=int, help="steps (default: 500 for stage 1 and 2, 1000 joint)")
parser.add_argument("--batch_size", type=int, default=64, help="images per step per process")
parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
parser.add_argument("--min_lr", type=float, default=1e-4, help="learning rate at the end of the cosine decay")
parser.add_argument("--warmup_iters", type=int, default=50, help="linear warm-up steps")
parser.add_argument("--grad_clip", type=float, default=1.0, help="clip the gradient norm (0 = off)")
# system
parser.add_argument("--out_dir", default="out", help="where checkpoints, latents and pictures go")
parser.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes")
add_run_options(parser, log_interval=50, ckpt_interval=250)  # --seed --device --compile --dtype --resume ...
parser.add_argument("--overwrite", action="store_true", help="allow replacing a finished autoencoder of the other kind")
args = parser.parse_args()
INHERITED = {"data": "shapes", "data_dir": "data", "image_size": 32, "channels": 3, "data_seed": 0, "ch": 16,
             "ch_mult": "1,2,4", "num_res_blocks": 1, "z_channels": 4}  # the * options and their defaults
master_process = int(os.environ.get("RANK", 0)) == 0  # only rank 0 prints and writes files

# -----------------------------------------------------------------------------
# argument checks, all before any work: one line each
if args.max_iters is None:
    args.max_iters = 1000 if args.stage == "joint" else 500
for name in ("max_iters", "batch_size", "ch", "z_channels", "num_res_blocks", "image_size", "log_interval",
             "ckpt_interval"):
    if getattr(args, name) is not None and getattr(args, name) <= 0:
        fail(f"--{name} must be positive, got {getattr(args, name)}")
if args.lr <= 0 or args.min_lr < 0 or args.kl_weight < 0 or args.gan_weight < 0:
    fail("--lr must be positive and --min_lr, --kl_weight, --gan_weight not negative")
if not (0 <= args.aux_dropout < 1 and 0 <= args.dropout < 1 and args.aux_width > 0):
    fail("dropouts must lie in [0, 1) and --aux_width must be positive")
if isinstance(args.ch_mult, str):  # "1,2,4" -> [1, 2, 4]: one entry per resolution level
    try:
        args.ch_mult = [int(m) for m in args.ch_mult.split(",")]
    except ValueError:
        fail(f"--ch_mult takes comma-separated whole numbers such as 1,2,4, got '{args.ch_mult}'")
final_stage = args.stage != "1"  # stage 2 and joint both produce the autoencoder the prior uses
ckpt_path = os.path.join(args.out_dir, "ae.pt" if final_stage else "ae_stage1.pt")
stage1_path = os.path.join(args.out_dir, "ae_stage1.pt")
check_out_dir(args.out_dir, master_process)

# stage 2 starts from stage 1's encoder, and --resume from this stage's own checkpoint: the * options
# come from there unless given, and one that contradicts it is refused
source = None
if args.resume:
    source = load_checkpoint(ckpt_path, "autoencoder", command("train_ae.py", "--stage", args.stage, "--out_dir", args.out_dir))
    if source["stage"] != args.stage:
        fail(f"{ckpt_path} holds stage {source['stage']}, not stage {args.stage}: resume with --stage {source['stage']}")
elif args.stage == "2":
    source = load_checkpoint(stage1_path, "autoencoder", command("train_ae.py", "--stage", "1", "--out_dir", args.out_dir))
taken = []
for key, default in INHERITED.items():
    saved = source["config"].get(key, default) if source else None
    if getattr(args, key) is None:
        setattr(args, key, saved if source else default)
        taken += [f"--{key} {','.join(map(str, saved)) if isinstance(saved, list) else saved}"] if source else []
    elif source and key != "data_dir" and getattr(args, key) != saved:  # the data may have moved
        fail(f"{ckpt_path if args.resume else stage1_path} was trained with --{key} {saved}, this run asks for "
             f"{getattr(args, key)}: drop --{key} (it is taken from there) or use another --out_dir")
if isinstance(args.ch_mult, str):
    args.ch_mult = [int(m) for m in args.ch_mult.split(",")]
# stage 2 trains no auxiliary decoder; ae.pt records stage 1's instead, the decoder class that shaped this
# latent (distance.py probes it as the last class of the capacity curve)
if args.stage == "2":
    args.aux_width, args.aux_dropout = source["config"]["aux_width"], source["config"]["aux_dropout"]
    taken += [f"--aux_width {args.aux_width} --aux_dropout {args.aux_dropout}"]
if taken and master_process:
    print(f"options taken from {ckpt_path if args.resume else stage1_path}: {' '.join(taken)}")
downsample = 2 ** (len(args.ch_mult) - 1)
if args.image_size % downsample:
    fail(f"--image_size {args.image_size} is not divisible by the downsampling factor {downsample} of --ch_mult")
if final_stage and not args.resume and not args.overwrite and os.path.isfile(ckpt_path):
    try:  # a finished autoencoder of the other kind (DAE vs joint) is a result: never replace it silently
        existing = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception:  # unreadable: nothing worth keeping
        existing = {}
    if "latent_scale" in existing and existing.get("stage") != args.stage:
        fail(f"{ckpt_path} holds a finished stage-{existing['stage']} autoencoder (and latents.pt its latents): "
             f"add --overwrite to replace them, or use another --out_dir")

# -----------------------------------------------------------------------------
# processes, devices, precision, data
rank, world_size, device = setup_distributed(args.device)  # also checks that --device exists here
args.dtype, autocast = precision(device, args.dtype)  # bf16 autocast on GPUs, float32 on cpu unless asked
train_set, val_set, _, image_shape, num_classes = get_dataset(args.data, args.data_dir, args.image_size,
                                                               args.channels, args.download, args.data_seed)

# -----------------------------------------------------------------------------
# The three kinds of run differ only here: which decoder the encoder trains with, and what is frozen.
torch.manual_seed(args.seed)  # the same initial weights on every rank
arch = dict(img_channels=image_shape[0], ch=args.ch, ch_mult=args.ch_mult, num_res_blocks=args.num_res_blocks,
            z_channels=args.z_channels, dropout=args.dropout)
if args.stage == "1":
    # DAE stage 1: the auxiliary decoder is thinner (aux_width) and/or noisier (aux_dropout) than the
    # real one, so the encoder must find a latent that a low-complexity generator can decode
    model = Autoencoder(**arch, dec_width=args.aux_width, dec_dropout=args.aux_dropout)
elif args.stage == "2":
    # DAE stage 2: stage 1's encoder, frozen (the latent no longer changes), and a full decoder trained
    # from scratch on it. Frozen = no gradient, and eval mode so encoder dropout cannot jitter the latent
    model = Autoencoder(**arch, dec_width=1.0, dec_dropout=args.dropout)
    encoder_half = {k: v for k, v in source["model"].items() if k.startswith(("encoder.", "quant_conv."))}
    if not args.resume:
        model.load_state_dict(encoder_half, strict=False)
    model.freeze_encoder()
else:
    # joint: the usual autoencoder, encoder and full decoder trained together (the baseline)
    model = Autoencoder(**arch, dec_width=1.0, dec_dropout=args.dropout)
model.to(device)
# only what this stage trains goes to the optimizer: in stage 2 the frozen encoder gets no moments
trainable = [p for p in model.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(trainable, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
# optional adversarial loss (VQGAN): not wrapped in DDP, its gradients are averaged by hand below
discriminator = PatchDiscriminator(image_shape[0], args.ch * 2).to(device) if args.gan_weight > 0 else None
opt_disc = torch.optim.AdamW(discriminator.parameters(), lr=args.lr, betas=(0.5, 0.9)) if discriminator else None

start_step = 0
if args.resume:
    model.load_state_dict(source["model"])
    optimizer.load_state_dict(source["optimizer"])
    if (discriminator is not None) != ("discriminator" in source):
        fail(f"{ckpt_path} was trained {'with' if 'discriminator' in source else 'without'} --gan_weight: "
             f"resume with the same --gan_weight")
    if discriminator is not None:
        discriminator.load_state_dict(source["discriminator"])
        opt_disc.load_state_dict(source["opt_disc"])
    start_step = source["step"]
    if master_process:
        print(f"resuming stage {args.stage} from step {start_step}")

if master_process:
    print(f"stage {args.stage}: encoder {sum(p.numel() for p in model.encoder.parameters()) / 1e6:.2f}M params, "
          f"decoder {sum(p.numel() for p in model.decoder.parameters()) / 1e6:.2f}M params, "
          f"{len(trainable)} trainable tensors")
raw_model = model  # checkpoints save this one: no "_orig_mod." (compile) or "module." (DDP) prefixes
initial_checksum(raw_model, rank, world_size)
model = wrap_model(model, args.compile, device, world_size, master_process)


def checkpoint(step):
    """Everything needed to continue exactly: weights, optimizer moments, step, config. The random
    draws of step s are seeded from (seed, rank, s), so the step also restores every random stream."""
    state = {"kind": "autoencoder", "stage": args.stage, "step": step, "config": vars(args),
             "image_shape": list(image_shape), "num_classes": num_classes,
             "model": raw_model.state_dict(), "optimizer": optimizer.state_dict()}
    if discriminator is not None:
        state["discriminator"], state["opt_disc"] = discriminator.state_dict(), opt_disc.state_dict()
    return state


def recon_loss(x, recon):
    # L1 (the default) keeps edges sharper than MSE, which averages a blurry edge into a cheap compromise
    return (x - recon).abs().mean() if args.recon_loss == "l1" else F.mse_loss(recon, x)


def adversarial_loss(recon, step):
    """The autoencoder's side of VQGAN's optional adversarial loss: look real (0 while it is off)."""
    if discriminator is None or step < args.gan_start:
        return 0.0
    return args.gan_weight * discriminator.generator_loss(recon)


def train_discriminator(x, recon, step):
    """The discriminator's own step, on its hinge loss alone (nothing while the adversarial loss is off)."""
    if discriminator is None or step < args.gan_start:
        return
    with autocast:
        d_loss = discriminator.hinge_loss(x, recon)
    d_loss.backward()
    average_gradients(discriminator, world_size)  # not wrapped in DDP: its gradients are averaged here
    opt_disc.step()
    opt_disc.zero_grad(set_to_none=True)


# -----------------------------------------------------------------------------
# the training loop
loader = make_loader(train_set, args.batch_size, args.seed, start_step, args.max_iters, rank, world_size, args.num_workers)
if master_process:
    print(f"global batch {args.batch_size * world_size} ({world_size} process(es) x {args.batch_size}), "
          f"steps {start_step} -> {args.max_iters}")
log = TrainLog(args.out_dir, f"ae stage {args.stage}", ["loss", "recon", "kl"], args.log_interval, args.max_iters,
               args.batch_size * world_size, "img", world_size, master_process)
model.train()
step = start_step
try:
    for x, _, _ in loader:
        torch.manual_seed(step_seed(args.seed, rank, step))  # this step's draws: posterior noise, dropout
        lr = get_lr(step, args.lr, args.warmup_iters, args.max_iters, args.min_lr)
        for group in optimizer.param_groups + (opt_disc.param_groups if opt_disc else []):
            group["lr"] = lr
        x = x.to(device, non_blocking=True)
        with autocast:
            # model(x) encodes, draws z = mean + std * noise (the reparameterisation trick, so the
            # gradient reaches the encoder) and decodes; kl is the mean KL per latent element
            recon, kl = model(x)
            rec = recon_loss(x, recon.float())
            loss = rec + args.kl_weight * kl + adversarial_loss(recon, step)
        loss.backward()
        # clipping (a rare huge gradient early on must not wreck the weights) also measures the norm,
        # and nothing non-finite may reach the weights: every process stops together if it would
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip if args.grad_clip > 0 else math.inf)
        check_step_is_finite(loss, grad_norm, world_size, step, ckpt_path, args.lr)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train_discriminator(x, recon, step)
        step += 1
        log.add(loss, rec, kl)
        log.after_step(step, lr)
        if master_process and (step % args.ckpt_interval == 0 or step == args.max_iters):
            save_checkpoint(checkpoint(step), ckpt_path)
except KeyboardInterrupt:  # Ctrl-C: keep the finished steps, then say how to continue
    if master_process:
        save_checkpoint(checkpoint(step), ckpt_path)
        print(f"\ninterrupted: saved step {step} to {ckpt_path}; continue with: {resume_command()}")
    raise SystemExit(130)

# -----------------------------------------------------------------------------
# after training: measure on the validation split, and for the final autoencoder cache the latents
finish_distributed(raw_model, rank, world_size, log.local_loss)  # every rank ends with the same weights
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
    mean, std, _ = encode_all(val_set)
    images = torch.stack([val_set[i][0] for i in range(len(val_set))])
    recons = torch.cat([raw_model.decode(m.to(device)).float().cpu() for m in mean.split(256)])
    # PSNR from the posterior mean (no sampling noise), so two runs compare the decoders, not the dice
    mse = ((recons.clamp(-1, 1) - images) / 2).pow(2).flatten(1).mean(1)  # per image, on a [0, 1] scale
    psnr = (10 * torch.log10(1 / mse.clamp_min(1e-10))).mean().item()
    pairs = torch.stack([images[:32], recons[:32]], dim=1).flatten(0, 1)  # original, reconstruction, ...
    grid_path = os.path.join(args.out_dir, "recon.png" if final_stage else "recon_stage1.png")
    save_grid(pairs, grid_path, nrow=8)
state = checkpoint(step)
state["val_psnr"] = psnr
print(f"validation reconstruction PSNR {psnr:.2f} dB (decoding the posterior mean); grid in {grid_path}")
if final_stage:
    mean, std, labels = encode_all(train_set)
    # scale latents to unit variance for the prior (latent diffusion's "scale factor"); the variance of
    # a posterior sample z = mean + std * noise is Var(mean) + E[std^2]
    latent_scale = 1.0 / (mean.var() + std.pow(2).mean()).sqrt().item()
    state["latent_scale"] = latent_scale
    # the fingerprint ties everything trained on these latents (the prior) to this very file
    state["latents_fingerprint"] = fingerprint(mean, std)
    latents = {"kind": "latents", "mean": mean, "std": std, "labels": labels, "latent_scale": latent_scale,
               "num_classes": num_classes, "ae_stage": args.stage, "fingerprint": state["latents_fingerprint"]}
    save_checkpoint(latents, os.path.join(args.out_dir, "latents.pt"))
    print(f"latent scale {latent_scale:.4f}; wrote {len(labels)} latents of shape {tuple(mean.shape[1:])} "
          f"to {os.path.join(args.out_dir, 'latents.pt')}")
save_checkpoint(state, ckpt_path)
