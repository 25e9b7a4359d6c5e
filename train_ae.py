"""
Train the autoencoder, the Decoupled Autoencoder (DAE) way or the usual joint way.

  python train_ae.py --stage 1       # encoder + a deliberately weak auxiliary decoder
  python train_ae.py --stage 2       # frozen encoder + the full decoder, trained from scratch
  python train_ae.py --stage joint   # the baseline: encoder + full decoder together, same total steps

Stage 2 and joint both end by writing out/ae.pt (with the latent scale) and out/latents.pt, the
training set encoded once, which train_prior.py reads. On GPUs:
  python train_ae.py --stage 1 --data cifar10 --data_dir ~/data --batch_size 256
  torchrun --standalone --nproc_per_node=8 train_ae.py --stage 1 ...   # DDP, batch_size per GPU

Why two stages (Hu et al., "Complexity Matters", NeurIPS 2023): the best latent for a generator
of limited complexity is the one that generator can most easily turn back into data. A weak
decoder can only reconstruct from a simple latent, so training the encoder against one (stage 1)
pushes it toward a latent that is simple to model. The strong decoder of stage 2 then buys back
reconstruction detail without changing the latent.
"""
import argparse
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import (DATA_DEFAULTS, add_data_options, dataset_of, encode_dataset, fingerprint,
                  load_checkpoint, make_loader, save_checkpoint, step_seed)
from model import Autoencoder, Normalize
from plumbing import (FiniteGuard, HelpFormatter, TrainLog, add_run_options, average_gradients,
                      check_out_dir, command, fail, finish_distributed, get_lr, initial_checksum,
                      int_list, non_negative, positive_float, positive_int, precision, probability,
                      save_grid, setup_distributed, stop_on_interrupt, wrap_model)

# -----------------------------------------------------------------------------
# every knob is an option; the defaults train the built-in shapes on a laptop CPU in minutes.
# Options marked * describe the data and the networks: stage 2 takes them from the stage-1
# checkpoint and --resume from its own, so they need not be repeated (and must not contradict it)
parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
parser.add_argument("--stage", required=True, choices=["1", "2", "joint"],
                    help="DAE stage 1, stage 2, or the joint baseline")
add_data_options(parser)  # * --data --data_dir --image_size --channels ... (data.py)
# the autoencoder (the defaults map 1x32x32 images to a 4x8x8 latent)
parser.add_argument("--ch", type=positive_int, help="* base width of encoder and decoder (default: 16)")
parser.add_argument("--ch_mult", type=int_list,
                    help="* width multiplier per level; each extra level halves the size "
                         "(default: 1,2,4)")
parser.add_argument("--num_res_blocks", type=positive_int, help="* ResNet blocks per level (default: 1)")
parser.add_argument("--z_channels", type=positive_int, help="* latent channels (default: 4)")
parser.add_argument("--dropout", type=probability, default=0.0,
                    help="dropout in the encoder and the full decoder")
# the DAE's weak auxiliary decoder (stage 1). How the default was chosen: assets/RESULTS.md,
# "Is the DAE latent better than a jointly trained one?"
parser.add_argument("--aux_width", type=positive_float,
                    help="* stage 1: width multiplier of the auxiliary decoder (default: 1)")
parser.add_argument("--aux_dropout", type=probability,
                    help="* stage 1: dropout in the auxiliary decoder (default: 0.2)")
parser.add_argument("--latent_noise", type=non_negative, help="* stage 1 and joint: the decoder "
                    "reads the latent plus noise of this many times its spread (default: 0)")
parser.add_argument("--scale_equiv", type=probability, help="* stage 1 and joint: share of steps "
                    "whose latent and image are both pooled to half size (EQ-VAE; default: 0.5)")
# the loss: reconstruction + kl_weight * KL (+ gan_weight * adversarial, off by default)
parser.add_argument("--recon_loss", default="l1", choices=["l1", "mse"],
                    help="pixel reconstruction loss")
parser.add_argument("--kl_weight", type=non_negative, default=1e-4,
                    help="weight of KL(q(z|x) || N(0, I)) per latent element")
parser.add_argument("--gan_weight", type=non_negative, default=0.0,
                    help="weight of VQGAN's patch-discriminator loss (0 = off)")
parser.add_argument("--gan_start", type=int, default=0, help="step at which the GAN loss starts")
# optimisation
parser.add_argument("--max_iters", type=positive_int,
                    help="steps (default: 500 for stage 1 and 2, 1000 joint)")
parser.add_argument("--batch_size", type=positive_int, default=64, help="images per step per process")
parser.add_argument("--lr", type=positive_float, default=1e-3, help="peak learning rate")
parser.add_argument("--min_lr", type=non_negative, default=1e-4,
                    help="learning rate at the end of the cosine decay")
parser.add_argument("--warmup_iters", type=int, default=50, help="linear warm-up steps")
parser.add_argument("--grad_clip", type=non_negative, default=1.0,
                    help="clip the gradient norm (0 = off)")
# system
parser.add_argument("--out_dir", default="out", help="where checkpoints, latents and pictures go")
parser.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes")
add_run_options(parser, log_interval=50, ckpt_interval=250)  # --seed --device --dtype --resume ...
parser.add_argument("--overwrite", action="store_true",
                    help="allow replacing a finished autoencoder of the other kind")
args = parser.parse_args()
master_process = int(os.environ.get("RANK", 0)) == 0  # only rank 0 prints and writes files

# the * options and their defaults (the auxiliary decoder's two belong to the DAE only)
CHECKPOINT_OPTIONS = {**DATA_DEFAULTS, "ch": 16, "ch_mult": [1, 2, 4], "num_res_blocks": 1,
                      "z_channels": 4, "aux_width": 1.0, "aux_dropout": 0.2, "latent_noise": 0.0,
                      "scale_equiv": 0.5}
# a checkpoint written before an option existed was trained without it (scale_equiv was 0 then)
IF_ABSENT = {**CHECKPOINT_OPTIONS, "scale_equiv": 0.0}
del CHECKPOINT_OPTIONS["download"]  # (an action, not a property of the data)
AUX_OPTIONS = ("aux_width", "aux_dropout")


def checkpoint_to_follow():
    """The checkpoint whose * options this run takes: its own with --resume, stage 1's in stage 2,
    none otherwise. Returns (path, state) or (None, None)."""
    if args.resume:
        make_it = command("train_ae.py", "--stage", args.stage, "--out_dir", args.out_dir)
        state = load_checkpoint(ckpt_path, "autoencoder", make_it)
        if state["stage"] != args.stage:
            fail(f"{ckpt_path} holds stage {state['stage']}, not stage {args.stage}: "
                 f"resume with --stage {state['stage']}")
        return ckpt_path, state
    if args.stage == "2":
        make_it = command("train_ae.py", "--stage", "1", "--out_dir", args.out_dir)
        return stage1_path, load_checkpoint(stage1_path, "autoencoder", make_it)
    return None, None


def take_checkpoint_options(path, state):
    """Fill in the * options from the checkpoint followed (or the defaults), refuse a contradiction
    in one line, and say which were taken. The auxiliary decoder *is* the DAE: a resumed stage 1
    keeps its own, and stage 2 records stage 1's (the class that shaped this latent)."""
    names = [k for k in CHECKPOINT_OPTIONS if args.stage != "joint" or k not in AUX_OPTIONS]
    taken = []
    for key in names:
        value = getattr(args, key)
        if state is None:
            setattr(args, key, CHECKPOINT_OPTIONS[key] if value is None else value)
            continue
        saved = state["config"].get(key, IF_ABSENT[key])
        if value is None:
            setattr(args, key, saved)
            shown = ",".join(map(str, saved)) if key == "ch_mult" else saved
            taken.append(f"--{key} {shown}")
        elif key != "data_dir" and value != saved:  # (the data may have moved)
            fail(f"{path} was trained with --{key} {saved}, this run asks for {value}: "
                 f"drop --{key} (it is taken from there) or use another --out_dir")
    if taken and master_process:
        print(f"options taken from {path}: {' '.join(taken)}")


def refuse_to_replace_the_other_kind():
    """A finished autoencoder of the other kind (DAE vs joint) is a result: never replace it
    without --overwrite."""
    if not final_stage or args.resume or args.overwrite or not os.path.isfile(ckpt_path):
        return
    try:
        existing = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception:  # unreadable: nothing worth keeping
        return
    if "latent_scale" in existing and existing.get("stage") != args.stage:
        fail(f"{ckpt_path} holds a finished stage-{existing['stage']} autoencoder (and latents.pt "
             f"its latents): add --overwrite to replace them, or use another --out_dir")


# -----------------------------------------------------------------------------
# argument checks, all before any work: one line each (argparse's types did the ranges)
if args.stage == "joint" and (args.aux_width is not None or args.aux_dropout is not None):
    fail("--aux_width and --aux_dropout shape DAE stage 1; the joint baseline trains no auxiliary "
         "decoder: drop them")
if args.max_iters is None:
    args.max_iters = 1000 if args.stage == "joint" else 500
final_stage = args.stage != "1"  # stage 2 and joint both produce the autoencoder the prior uses
stage1_path = os.path.join(args.out_dir, "ae_stage1.pt")
ckpt_path = os.path.join(args.out_dir, "ae.pt" if final_stage else "ae_stage1.pt")
check_out_dir(args.out_dir, master_process)
source_path, source = checkpoint_to_follow()
take_checkpoint_options(source_path, source)
downsample = 2 ** (len(args.ch_mult) - 1) * (2 if args.scale_equiv > 0 else 1)  # (halves latents)
if args.image_size % downsample:
    fail(f"--image_size {args.image_size} is not divisible by {downsample}, the downsampling factor "
         f"of --ch_mult (times 2 with --scale_equiv)")
refuse_to_replace_the_other_kind()

# -----------------------------------------------------------------------------
# processes, devices, precision, data
rank, world_size, device = setup_distributed(args.device)  # also checks that --device exists
args.dtype, autocast = precision(device, args.dtype)  # bf16 autocast on GPUs, float32 on a cpu
train_set, val_set, _, image_shape, num_classes = dataset_of(vars(args))

# -----------------------------------------------------------------------------
# The three kinds of run differ only here: which decoder the encoder trains with, what is frozen.
torch.manual_seed(args.seed)  # the same initial weights on every rank
arch = dict(img_channels=image_shape[0], ch=args.ch, ch_mult=args.ch_mult,
            num_res_blocks=args.num_res_blocks, z_channels=args.z_channels, dropout=args.dropout)
if args.stage == "1":
    # DAE stage 1: the auxiliary decoder is thinner (aux_width) and/or noisier (aux_dropout) than
    # the real one, so the encoder must find a latent that a low-complexity generator can decode
    model = Autoencoder(**arch, dec_width=args.aux_width, dec_dropout=args.aux_dropout)
elif args.stage == "2":
    # DAE stage 2: stage 1's encoder, frozen (the latent no longer changes), and a full decoder
    # trained from scratch on it. Frozen: no gradient, and eval mode, so that encoder dropout
    # cannot jitter the latent
    model = Autoencoder(**arch, dec_width=1.0, dec_dropout=args.dropout)
    encoder_half = {k: v for k, v in source["model"].items()
                    if k.startswith(("encoder.", "quant_conv."))}
    if not args.resume:
        model.load_state_dict(encoder_half, strict=False)
    model.freeze_encoder()
else:
    # joint: the usual autoencoder, encoder and full decoder trained together (the baseline)
    model = Autoencoder(**arch, dec_width=1.0, dec_dropout=args.dropout)
model.to(device)
# only what this stage trains goes to the optimizer: in stage 2 the frozen encoder has no moments
trainable = [p for p in model.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(trainable, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)


class PatchDiscriminator(nn.Sequential):
    """VQGAN's optional adversarial loss (Esser et al. 2021): scores image patches as real (> 0)
    or not (< 0), one score per patch: (N, 1, H/4, W/4)."""

    def __init__(self, in_channels=1, ch=32):
        super().__init__(nn.Conv2d(in_channels, ch, 4, 2, 1), nn.LeakyReLU(0.2),
                         nn.Conv2d(ch, 2 * ch, 4, 2, 1), Normalize(2 * ch), nn.LeakyReLU(0.2),
                         nn.Conv2d(2 * ch, 1, 3, 1, 1))

    def hinge_loss(self, real, fake):
        """The discriminator's own loss: real patches above +1, reconstructions below -1."""
        scores = self(torch.cat([real, fake.detach()])).float()  # both halves in one pass
        real_scores, fake_scores = scores.chunk(2)
        return F.relu(1 - real_scores).mean() + F.relu(1 + fake_scores).mean()

    def generator_loss(self, fake):
        """The autoencoder's adversarial term: look real. Only the autoencoder learns from it:
        frozen here, the discriminator gets no gradient against its own hinge loss."""
        self.requires_grad_(False)
        loss = -self(fake).float().mean()
        self.requires_grad_(True)
        return loss


# the optional adversarial loss: not wrapped in DDP, its gradients are averaged by hand below
discriminator, opt_disc = None, None
if args.gan_weight > 0:
    discriminator = PatchDiscriminator(image_shape[0], args.ch * 2).to(device)
    opt_disc = torch.optim.AdamW(discriminator.parameters(), lr=args.lr, betas=(0.5, 0.9))

start_step = source["step"] if args.resume else 0
if args.resume:
    model.load_state_dict(source["model"])
    optimizer.load_state_dict(source["optimizer"])
    if (discriminator is not None) != ("discriminator" in source):
        had = "with" if "discriminator" in source else "without"
        fail(f"{ckpt_path} was trained {had} --gan_weight: resume with the same --gan_weight")
    if discriminator is not None:
        discriminator.load_state_dict(source["discriminator"])
        opt_disc.load_state_dict(source["opt_disc"])
    if master_process:
        print(f"resuming stage {args.stage} from step {start_step}")

if master_process:  # the decoder as built: its width (channels / the full ones) and dropout
    encoder_params = sum(p.numel() for p in model.encoder.parameters())
    decoder_params = sum(p.numel() for p in model.decoder.parameters())
    decoder_width = model.decoder.layers[-1].in_channels / args.ch
    decoder_dropout = max(m.p for m in model.decoder.modules() if isinstance(m, nn.Dropout))
    print(f"stage {args.stage}: encoder {encoder_params / 1e6:.2f}M params, decoder "
          f"{decoder_params / 1e6:.2f}M params (width {decoder_width:g}, dropout "
          f"{decoder_dropout:g}), {len(trainable)} trainable tensors")
raw_model = model  # checkpoints save this one: no "_orig_mod." (compile) or "module." (DDP)
initial_checksum(raw_model, rank, world_size)
model = wrap_model(model, args.compile, device, world_size, master_process)
guard = FiniteGuard(device, world_size, ckpt_path, args.lr)


def checkpoint(step):
    """Everything needed to continue exactly: weights, optimizer moments, step, config. The random
    draws of step s are seeded from (seed, rank, s), so the step also restores every stream."""
    config = vars(args).copy()
    if args.stage == "joint":  # no auxiliary decoder was ever used
        config.update(aux_width=None, aux_dropout=None)
    state = {"kind": "autoencoder", "stage": args.stage, "step": step, "config": config,
             "image_shape": list(image_shape), "num_classes": num_classes,
             "model": raw_model.state_dict(), "optimizer": optimizer.state_dict()}
    if discriminator is not None:
        state["discriminator"] = discriminator.state_dict()
        state["opt_disc"] = opt_disc.state_dict()
    return state


def recon_loss(x, recon):
    # L1 (the default) keeps edges sharper than MSE, which settles for a blurry compromise
    if args.recon_loss == "l1":
        return (x - recon).abs().mean()
    return F.mse_loss(recon, x)


def train_discriminator(x, recon, step):
    """The discriminator's own step, on its hinge loss alone, checked like the autoencoder's."""
    with autocast():
        d_loss = discriminator.hinge_loss(x, recon)
    d_loss.backward()
    if world_size > 1:  # not wrapped in DDP: average its gradients here
        average_gradients(discriminator.parameters(), world_size)
    d_norm = torch.nn.utils.clip_grad_norm_(discriminator.parameters(), math.inf)  # just the norm
    guard.check(d_loss, d_norm, discriminator.parameters(), step)
    opt_disc.step()
    opt_disc.zero_grad(set_to_none=True)


# -----------------------------------------------------------------------------
# the training loop
loader = make_loader(train_set, args.batch_size, args.seed, start_step, args.max_iters, rank,
                     world_size, args.num_workers)
if master_process:
    print(f"global batch {args.batch_size * world_size} ({world_size} process(es) x "
          f"{args.batch_size}), steps {start_step} -> {args.max_iters}")
log = TrainLog(args.out_dir, f"ae stage {args.stage}", ["loss", "recon", "kl"], args.log_interval,
               args.max_iters, args.batch_size * world_size, "img", world_size, master_process)
model.train()
step = start_step
regularise = args.stage != "2"  # the latent's regularisers shape the encoder; stage 2 reads it as is
try:
    for x, _, _ in loader:
        torch.manual_seed(step_seed(args.seed, rank, step))  # this step's posterior noise, dropout
        lr = get_lr(step, args.lr, args.warmup_iters, args.max_iters, args.min_lr)
        for group in optimizer.param_groups + (opt_disc.param_groups if opt_disc else []):
            group["lr"] = lr
        x = x.to(device, non_blocking=True)
        # EQ-VAE: on a share scale_equiv of the steps, a half-size latent must give a half-size image
        equiv = regularise and args.scale_equiv > 0 and torch.rand(()).item() < args.scale_equiv
        pool = 2 if equiv else 1
        gan_on = discriminator is not None and step >= args.gan_start
        with autocast():
            # model(x) encodes, draws z = mean + std * noise (the reparameterisation trick, so the
            # gradient reaches the encoder) and decodes; kl is the mean KL per latent element
            recon, kl = model(x, args.latent_noise if regularise else 0.0, pool)
            x = F.avg_pool2d(x, pool)  # the target, pooled like the latent (pool 1 leaves it be)
            rec = recon_loss(x, recon.float())
            loss = rec + args.kl_weight * kl
            if gan_on:
                loss = loss + args.gan_weight * discriminator.generator_loss(recon)
        loss.backward()
        # clipping (a rare huge gradient early on must not wreck the weights) also measures the
        # norm, and a non-finite step never reaches the weights (see plumbing.FiniteGuard)
        max_norm = args.grad_clip if args.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_norm)
        guard.check(loss, grad_norm, trainable, step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if gan_on:
            train_discriminator(x, recon, step)
        step += 1

        log.add(loss, rec, kl)
        save_now = step % args.ckpt_interval == 0 or step == args.max_iters
        log.after_step(step, lr, guard, save_now)  # stops the run if any step was not finite
        if master_process and save_now:
            save_checkpoint(checkpoint(step), ckpt_path)
except KeyboardInterrupt:  # Ctrl-C: keep the finished steps, then say how to continue
    stop_on_interrupt(step, guard, master_process, lambda: save_checkpoint(checkpoint(step), ckpt_path),
                      ckpt_path)

# -----------------------------------------------------------------------------
# after training: measure on the validation split, and for the final autoencoder cache the latents
finish_distributed(raw_model, rank, world_size, log.local_loss)  # every rank, the same weights
if not master_process:
    raise SystemExit(0)
raw_model.eval()
with torch.no_grad():
    mean, std, _ = encode_dataset(raw_model, val_set, device, args.num_workers)
    images = torch.stack([val_set[i][0] for i in range(len(val_set))])
    recons = torch.cat([raw_model.decode(m.to(device)).float().cpu() for m in mean.split(256)])
    # PSNR from the posterior mean (no sampling noise), so two runs compare the decoders
    mse = ((recons.clamp(-1, 1) - images) / 2).pow(2).flatten(1).mean(1)  # per image, on [0, 1]
    psnr = (10 * torch.log10(1 / mse.clamp_min(1e-10))).mean().item()
    pairs = torch.stack([images[:32], recons[:32]], dim=1).flatten(0, 1)  # original, recon, ...
    grid_path = os.path.join(args.out_dir, "recon.png" if final_stage else "recon_stage1.png")
    save_grid(pairs, grid_path, nrow=8)
state = checkpoint(step)
state["val_psnr"] = psnr
print(f"validation reconstruction PSNR {psnr:.2f} dB (decoding the posterior mean); "
      f"grid in {grid_path}")
if final_stage:
    mean, std, labels = encode_dataset(raw_model, train_set, device, args.num_workers)
    # scale latents to unit variance for the prior (latent diffusion's "scale factor"); the
    # variance of a posterior sample z = mean + std * noise is Var(mean) + E[std^2]
    latent_scale = 1.0 / (mean.var() + std.pow(2).mean()).sqrt().item()
    state["latent_scale"] = latent_scale
    # the fingerprint ties everything trained on these latents (the prior) to this very file
    state["latents_fingerprint"] = fingerprint(mean, std)
    latents = {"kind": "latents", "mean": mean, "std": std, "labels": labels,
               "latent_scale": latent_scale, "num_classes": num_classes, "ae_stage": args.stage,
               "fingerprint": state["latents_fingerprint"]}
    latents_path = os.path.join(args.out_dir, "latents.pt")
    save_checkpoint(latents, latents_path)
    print(f"latent scale {latent_scale:.4f}; wrote {len(labels)} latents of shape "
          f"{tuple(mean.shape[1:])} to {latents_path}")
save_checkpoint(state, ckpt_path)
