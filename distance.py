"""
The paper's distance, as this project reads it: how far a latent is from the data, as seen by
decoders of limited complexity, estimated for one autoencoder's latent.

  python distance.py                          # the capacity curve of out/ae.pt's latent
  python distance.py --ae out/ae_stage1.pt    # the same for the stage-1 encoder
  python distance.py --patience 3 --steps 20000 --device cuda   # probes trained to convergence

The paper's abstract (Hu et al., "Complexity Matters", NeurIPS 2023) defines a distance between
the latent and the data distribution that depends on the generator's complexity, and names its
minimiser the best latent. This project formalises that as
    D_G(P_z, P_x) = inf_{g in G} d(g # P_z, P_x),
the best any decoder g of a class G can do at pushing the latent distribution P_z onto the data
P_x. With an encoder e (so P_z = e # P_x) and d the Wasserstein-1 distance with an L1 ground
cost, pairing each image with its own reconstruction is one transport plan, so
    d(g # e # P_x, P_x) <= E_x |g(e(x)) - x|,
and the best reconstruction error within G bounds D_G from above. `capacity_curve` estimates
that bound for several classes at once: fresh probe decoders of growing width, trained on the
frozen latent, scored on held-out images. A latent that is simple for a generator keeps its
bound low even for the thinnest probe. DAE stage 1 trains the encoder against one such class (the
auxiliary decoder) on a related objective: it decodes posterior samples, with dropout and a KL
term, while the probes here decode the posterior mean.
"""
import argparse
import json
import math
import os
import time

import torch

from data import dataset_of, load_autoencoder, load_split
from model import Decoder
from evaluate import features, frechet_distance, get_evaluator, render_iou
from plumbing import (HelpFormatter, check_device, check_out_dir, checked, command, fail, get_lr,
                      positive_float, positive_int, precision, table_line)

# -----------------------------------------------------------------------------
# the bound for one decoder class: train a probe decoder on the frozen latent


def train_probe(probe, z_train, x_train, steps, batch_size, lr, seed, autocast, patience=0,
                z_held=None, x_held=None, check_every=200):
    """Fit `probe` to map latents z_train back to images x_train (L1 loss, AdamW).

    With patience 0 it trains exactly `steps` steps on a warm-up + cosine learning rate: quick,
    but it mixes how fast a probe learns with what its class can represent. With patience P it
    trains to convergence instead: every `check_every` steps it measures the L1 on held-out
    training images (z_held, x_held), and after P checks in a row without a 0.5 % gain it goes
    back to the best weights and cuts the learning rate 4x. The third cut (or `steps`) ends it,
    at the best weights. Returns (steps trained, the step whose weights were kept)."""
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=0.0)
    order = torch.Generator(device=z_train.device).manual_seed(seed)  # the batches
    best_l1, best_step, best_weights = math.inf, 0, None  # the best held-out check so far
    peak_lr = lr  # the rate between drops
    lr_drops = 0
    checks_without_gain = 0
    step = 0
    while step < steps and lr_drops < 3:
        if patience:  # a short warm-up, then constant between the drops
            step_lr = min(peak_lr, lr * (step + 1) / 100)
        else:
            step_lr = get_lr(step, lr, steps // 10, steps, lr / 10)
        for group in optimizer.param_groups:
            group["lr"] = step_lr
        idx = torch.randint(len(z_train), (batch_size,), generator=order, device=z_train.device)
        with autocast():
            loss = (probe(z_train[idx]) - x_train[idx]).abs().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        # converging: check the held-out L1 (in eval mode: no dropout, as when scoring)
        if not patience or (step % check_every and step != steps):
            continue
        held_l1 = reconstruction_l1(probe.eval(), z_held, x_held)
        probe.train()
        if held_l1 < 0.995 * best_l1:
            best_l1, best_step = held_l1, step
            best_weights = {k: v.clone() for k, v in probe.state_dict().items()}
            checks_without_gain = 0
            continue
        checks_without_gain += 1
        if checks_without_gain >= patience:  # no progress at this rate: back to the best, slower
            probe.load_state_dict(best_weights)
            peak_lr /= 4
            lr_drops += 1
            checks_without_gain = 0

    if not patience:
        return step, step
    probe.load_state_dict(best_weights)
    return step, best_step


@torch.no_grad()
def reconstruction_l1(probe, z, x, batch_size=250):
    """Mean |probe(z) - x| per pixel, batch by batch."""
    errors = [(probe(zb) - xb).abs() for zb, xb in zip(z.split(batch_size), x.split(batch_size))]
    return torch.cat(errors).mean().item()


def capacity_curve(encode_fn, train_images, eval_images, classes=(0.125, 0.25, 0.5, 1.0),
                   steps=300, batch_size=32, lr=2e-3, seed=0, ch=16, ch_mult=(1, 2, 4),
                   num_res_blocks=1, device="cpu", patience=0, check_every=200, dtype="float32",
                   score=None):
    """The estimated bound on D_G for each decoder class G, one row per class.

    A class is a width (a Decoder with that fraction of the full decoder's channels), or a
    (width, dropout) pair, which trains with dropout like stage 1's auxiliary decoder. Each probe
    is a fresh Decoder of its class, trained with `train_probe` on the frozen latents of
    train_images (the same seed, so the same initial stream and batches, for every class), then
    scored on eval_images, which it never saw: l1 is the bound (W1 with the L1 ground cost, as
    well as training finds the best g in G), psnr the same error on another scale, params the
    size of the class. `score(reconstruct)` may add columns (distance.py adds unpaired FD and
    render IoU). encode_fn: images -> (N, z, h, w) latents, any function (a test scores noise)."""
    with torch.no_grad():  # the latent is frozen: encode every image once
        z_train = torch.cat([encode_fn(x.to(device)).float() for x in train_images.split(256)])
        z_eval = torch.cat([encode_fn(x.to(device)).float() for x in eval_images.split(256)])
    # one number rescales the latent to unit variance, so an encoder is judged on how easily its
    # numbers decode, not on their size (the prior sees the latent rescaled the same way)
    scale = z_train.std()
    z_train, z_eval = z_train / scale, z_eval / scale
    x_train = train_images.to(device)
    # with patience, the first 1,000 training images (at most a tenth) decide when to stop
    held = min(1000, len(z_train) // 10) if patience else 0
    z_held, x_held = z_train[:held], x_train[:held]
    z_train, x_train = z_train[held:], x_train[held:]
    dtype, autocast = precision(device, dtype)  # bf16 is faster, but moves a converged bound

    rows = []
    for probe_class in classes:
        width, dropout = probe_class if isinstance(probe_class, tuple) else (probe_class, 0.0)
        start = time.time()
        torch.manual_seed(seed)
        # the autoencoder's 1x1 post_quant_conv is left out: a linear map the first conv absorbs
        probe = Decoder(train_images.shape[1], ch, list(ch_mult), num_res_blocks, z_train.shape[1],
                        dropout, width).to(device)
        trained, kept = train_probe(probe, z_train, x_train, steps, batch_size, lr, seed, autocast,
                                    patience, z_held, x_held, check_every)
        probe.eval()  # the class is the decoders it trains, used without dropout

        with torch.no_grad():
            recon = torch.cat([probe(z).clamp(-1, 1).cpu() for z in z_eval.split(256)])
        mse = ((recon - eval_images) / 2).pow(2).flatten(1).mean(1)  # per image, on [0, 1]
        row = {"width": width, "dropout": dropout, "dtype": dtype,
               "params": sum(p.numel() for p in probe.parameters()), "steps": trained,
               "kept_step": kept, "l1": (recon - eval_images).abs().mean().item(),
               "psnr": (10 * torch.log10(1 / mse.clamp_min(1e-10))).mean().item()}
        if score is not None:
            row.update(score(lambda x: reconstruct(probe, encode_fn, x, scale, device)))
        row["seconds"] = time.time() - start
        rows.append(row)
        name = f"width {width}" + (f" drop {dropout}" if dropout else "")
        print(table_line(name, row, CURVE_COLUMNS))
    return rows


@torch.no_grad()
def reconstruct(probe, encode_fn, images, scale, device):
    """Images -> the latent -> a probe's reconstruction, in [-1, 1], on the cpu."""
    parts = []
    for x in images.split(256):
        parts.append(probe(encode_fn(x.to(device)).float() / scale).clamp(-1, 1).cpu())
    return torch.cat(parts)


CURVE_COLUMNS = [("params", "params", "d"), ("steps", "steps", "d"), ("l1", "L1 bound", ".4f"),
                 ("psnr", "PSNR", ".2f"), ("fd", "FD", ".3f"), ("render_iou", "renderIoU", ".3f"),
                 ("seconds", "seconds", ".0f")]


# -----------------------------------------------------------------------------
# the script: the capacity curve of one autoencoder's latent


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--out_dir", default="out",
                        help="where ae.pt is; evaluator.pt and distance.json go here")
    parser.add_argument("--ae", help="autoencoder checkpoint to score (default: out_dir/ae.pt)")
    parser.add_argument("--split", default="val", choices=["val", "test"],
                        help="the held-out images the probes are scored on")
    parser.add_argument("--widths", default="0.125,0.25,0.5,1,aux",
                        help="the probe classes G: widths, and aux = the decoder class the "
                             "encoder trained against (stage 1's auxiliary decoder)")
    parser.add_argument("--steps", type=positive_int, default=300,
                        help="training steps of each probe (with --patience: at most)")
    parser.add_argument("--patience", type=checked(int, lambda v: v >= 0, "0 or more"), default=0,
                        help="0: --steps each; N >= 1: to convergence (see train_probe)")
    parser.add_argument("--batch_size", type=positive_int, default=32, help="probe batch")
    parser.add_argument("--lr", type=positive_float, default=2e-3, help="probe peak learning rate")
    parser.add_argument("--num_train", type=positive_int, default=20_000,
                        help="training images the probes learn from")
    parser.add_argument("--eval_steps", type=positive_int, default=400,
                        help="training steps of the evaluator, if it is not cached yet")
    parser.add_argument("--seed", type=int, default=0, help="seeds the probes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda, mps")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="probe training precision (bf16 moves a converged bound)")
    args = parser.parse_args()
    widths = parse_widths(args.widths)
    ae_path = args.ae or os.path.join(args.out_dir, "ae.pt")
    check_device(args.device)
    check_out_dir(args.out_dir)  # the json (and evaluator.pt) go here, even with --ae elsewhere

    ae_dir = os.path.dirname(ae_path) or "."
    make_ae = (command("train_ae.py", "--stage", "1", "--out_dir", ae_dir) + " && "
               + command("train_ae.py", "--stage", "2", "--out_dir", ae_dir))
    ae, state = load_autoencoder(ae_path, make_ae, args.device)
    c = state["config"]
    train_set, val_set, test_set, image_shape, num_classes = dataset_of(c)
    eval_set, other_set = (val_set, test_set) if args.split == "val" else (test_set, val_set)
    train_images = load_split(train_set, args.num_train)[0]
    eval_images, _, factors = load_split(eval_set)
    score, reference = unpaired_scores(args, c, train_set, val_set, image_shape, num_classes,
                                       eval_images, load_split(other_set), factors.shape[1] > 0)

    budget = f"{args.steps} steps"
    if args.patience:
        budget = f"to convergence (patience {args.patience}, <= {args.steps} steps)"
    print(f"capacity curve of {ae_path} (stage {state['stage']}): probes train {budget}")
    print(table_line("", None, CURVE_COLUMNS))
    print(table_line("real images", reference, CURVE_COLUMNS))
    # aux: the decoder class the encoder was trained against: stage 1's auxiliary decoder for a
    # DAE, the full decoder itself for a joint autoencoder
    if state["stage"] == "joint":
        aux = (1.0, c["dropout"])
    else:
        aux = (c["aux_width"], c["aux_dropout"])
    classes = list(dict.fromkeys(aux if w == "aux" else (w, 0.0) for w in widths))

    def encode(images):  # the latent of an image: its posterior mean
        return ae.encode(images)[0]

    rows = capacity_curve(encode, train_images, eval_images, classes, args.steps, args.batch_size,
                          args.lr, args.seed, c["ch"], c["ch_mult"], c["num_res_blocks"],
                          args.device, args.patience, dtype=args.dtype, score=score)

    # out_dir/distance.json for ae.pt; another checkpoint gets its own file, e.g.
    # distance_ae_stage1.json
    name = "" if args.ae is None else "_" + os.path.splitext(os.path.basename(args.ae))[0]
    out_path = os.path.join(args.out_dir, f"distance{name}.json")
    with open(out_path, "w") as f:
        json.dump({"ae": ae_path, "ae_stage": state["stage"], "config": vars(args),
                   "reference": reference, "rows": rows}, f, indent=2)
    print(f"wrote {out_path}")


def parse_widths(text):
    """--widths "0.25,0.5,aux" -> [0.25, 0.5, "aux"], or a one-line error."""
    try:
        widths = [w if w == "aux" else float(w) for w in text.replace(" ", "").split(",")]
    except ValueError:
        fail(f"--widths takes comma-separated widths and aux, such as 0.25,0.5,1,aux; got '{text}'")
    if any(w != "aux" and w <= 0 for w in widths):
        fail(f"--widths must be positive, got '{text}'")
    return widths


def unpaired_scores(args, config, train_set, val_set, image_shape, num_classes, eval_images,
                    other_split, shapes):
    """Beside the bound: FD (and on the shapes render IoU) of a probe's reconstructions of the
    *other* held-out split against this one, unpaired like every row of sample.py --eval, and
    the floor they are compared with: the other split's real images. Without class labels there
    is no evaluator: then only the bound. Returns (score function, the floor's row)."""
    other_images, other_labels, _ = other_split
    if num_classes <= 1:
        print("one unlabelled class: no evaluator to score FD with, only the L1 bound")
        return None, {"width": "real"}
    evaluator, info = get_evaluator(args.out_dir, train_set, val_set, image_shape, num_classes,
                                    config, args.device, steps=args.eval_steps)
    r2 = "".join(f", R^2 {k} {v:.3f}" for k, v in info.get("factor_r2", {}).items())
    print(f"evaluator: validation accuracy {info['accuracy']:.3f}{r2}")
    eval_features = features(evaluator, eval_images)

    def score(reconstruct):
        recon = reconstruct(other_images)
        row = {"fd": frechet_distance(features(evaluator, recon), eval_features)}
        if shapes:
            row["render_iou"] = render_iou(recon, other_labels).mean().item()
        return row

    reference = {"width": "real",
                 "fd": frechet_distance(features(evaluator, other_images), eval_features)}
    if shapes:
        reference["render_iou"] = render_iou(other_images, other_labels).mean().item()
    return score, reference


if __name__ == "__main__":
    main()
