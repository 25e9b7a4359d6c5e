"""
How good is a latent? The paper's complexity-motivated distance, and the scores that judge samples.

  python distance.py --out_dir out                        # the capacity curve of out/ae.pt's encoder
  python distance.py --out_dir out --ae out/ae_stage1.pt  # the same for the stage-1 encoder
  python distance.py --out_dir out --patience 3 --steps 20000 --device cuda   # probes to convergence, on a GPU

The idea, in our reading of Hu et al. ("Complexity Matters", NeurIPS 2023): how far a latent distribution P_z is
from the data P_x depends on who has to bridge the gap. For a class G of decoders of bounded complexity,
D_G(P_z, P_x) = inf_{g in G} d_F(g # P_z, P_x). With an encoder e, P_z = e # P_x, and for the Wasserstein-1
distance d(g # e # P_x, P_x) <= E ||g(e(x)) - x|| (pair each x with its own reconstruction: one transport plan,
so at least as expensive as the best one). So the best reconstruction error inside G is an upper bound on D_G,
and DAE stage 1 minimises exactly this bound with G = the weak auxiliary decoder class. `capacity_curve`
estimates the bound for several G at once: fresh probe decoders of growing width, trained on the frozen latent.
A latent that is simple for a generator keeps its error low even for the thinnest probe.

The other scores need no downloads: FD is the Frechet Distance in the features of a small CNN (the
"evaluator") trained here once, deterministically: not FID, and only comparable under the same evaluator.
"""
import argparse
import json
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import FACTOR_NAMES, get_dataset, load_split, render_iou, shift_images
from model import Decoder
from plumbing import (HelpFormatter, check_device, check_out_dir, command, fail, get_lr, load_autoencoder,
                      load_checkpoint, precision, save_checkpoint, table_line)

# -----------------------------------------------------------------------------
# the complexity-motivated distance: best reconstruction error within decoder classes of growing width


def capacity_curve(encode_fn, train_images, eval_images, widths=(0.125, 0.25, 0.5, 1.0), steps=300,
                   batch_size=32, lr=2e-3, seed=0, ch=16, ch_mult=(1, 2, 4), num_res_blocks=1,
                   evaluator=None, eval_labels=None, device="cpu", patience=0, check_every=200, dtype="float32"):
    """For each width w, train a fresh probe Decoder(width=w) to map the frozen latents encode_fn(x) back to x
    (L1 loss, AdamW; a (width, dropout) pair trains with dropout, like stage 1's auxiliary decoder) and score it
    on images it never saw. patience 0 trains a fixed `steps` (cosine learning rate: quick, but it mixes how fast
    a probe learns with what its class can represent); patience P trains to convergence: every `check_every`
    steps the L1 on 1,000 training images held out from the probe is checked, P checks without a 0.5 % gain drop
    the learning rate 4x (back at the best weights), and the third drop (or `steps`) ends it at the best weights
    (kept_step). A row per width: params (the complexity of the class G), steps, l1 = mean |g(e(x)) - x| per
    pixel (the upper bound on D_G, W1 with the L1 ground cost, as well as training finds the best g in G), psnr,
    with an evaluator fd (and on the shapes render_iou). encode_fn: images -> (N, z, h, w) latents, any function
    (a test scores noise). Every width: the same seed. dtype: the training precision; scoring is float32."""
    with torch.no_grad():  # the latent is frozen: encode every image once
        z_train, z_eval = [torch.cat([encode_fn(batch.to(device)).float() for batch in images.split(256)])
                           for images in (train_images, eval_images)]
    # one number rescales the latent to unit variance, so an encoder is not judged on the size of its
    # numbers but on how easily they decode (the prior sees it rescaled the same way: latent_scale)
    scale = z_train.std()
    z_train, z_eval, train_images = z_train / scale, z_eval / scale, train_images.to(device)
    held = min(1000, len(z_train) // 10) if patience else 0  # a stopping set the probes never train on
    z_held, x_held, z_train, train_images = z_train[:held], train_images[:held], z_train[held:], train_images[held:]
    real_features, rows = features(evaluator, eval_images) if evaluator is not None else None, []
    dtype, autocast = precision(device, dtype)  # bf16 autocast: faster; moves a converged bound as a restart does
    for width in widths:
        (width, dropout), t0 = width if isinstance(width, tuple) else (width, 0.0), time.time()
        torch.manual_seed(seed)  # the same initialisation stream and batches for every width
        # the autoencoder's 1x1 post_quant_conv is left out: a linear map the first 3x3 conv absorbs
        probe = Decoder(train_images.shape[1], ch, list(ch_mult), num_res_blocks, z_train.shape[1], dropout, width).to(device)
        optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=0.0)
        order, peak, best, waited, step = torch.Generator().manual_seed(seed), lr, (math.inf, None, 0), 0, 0
        while step < steps and peak > lr / 4 ** 3:
            for group in optimizer.param_groups:  # converging: a warm-up, then constant between the drops
                group["lr"] = (min(peak, lr * (step + 1) / 100) if patience else
                               get_lr(step, lr, steps // 10, steps, lr / 10))
            idx = torch.randint(len(z_train), (batch_size,), generator=order)
            with autocast:
                loss = (probe(z_train[idx]) - train_images[idx]).abs().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if patience and (step % check_every == 0 or step == steps):  # (a last check at the ceiling)
                with torch.no_grad():  # in eval mode: dropout off while checking, as when scoring
                    held_l1 = torch.cat([(probe.eval()(z) - x).abs() for z, x in zip(z_held.split(250), x_held.split(250))])
                probe.train()
                held_l1 = held_l1.mean().item()
                if held_l1 < 0.995 * best[0]:
                    best, waited = (held_l1, {k: v.clone() for k, v in probe.state_dict().items()}, step), 0
                elif (waited := waited + 1) >= patience:
                    peak, waited = peak / 4, 0
                    probe.load_state_dict(best[1])
        if patience:
            probe.load_state_dict(best[1])
        probe.eval()  # dropout off: the class is the decoders it trains, used without dropout
        with torch.no_grad():
            recon = torch.cat([probe(z).clamp(-1, 1).cpu() for z in z_eval.split(256)])
        mse = ((recon - eval_images) / 2).pow(2).flatten(1).mean(1)  # per image, on a [0, 1] scale
        row = {"width": width, "dropout": dropout, "dtype": dtype, "params": sum(p.numel() for p in probe.parameters()),
               "steps": step, "kept_step": best[2] if patience else step, "l1": (recon - eval_images).abs().mean().item(),
               "psnr": (10 * torch.log10(1 / mse.clamp_min(1e-10))).mean().item()}
        if evaluator is not None:
            row["fd"] = frechet_distance(features(evaluator, recon), real_features)
            if eval_labels is not None:  # the built-in shapes: the decoded images against their ideal shapes
                row["render_iou"] = render_iou(recon, eval_labels).mean().item()
        row["seconds"] = time.time() - t0
        rows.append(row)
        print(table_line(f"width {width}" + (f" drop {dropout}" if dropout else ""), row, CURVE_COLUMNS))
    return rows


CURVE_COLUMNS = [("params", "params", "d"), ("steps", "steps", "d"), ("l1", "L1 bound", ".4f"), ("psnr", "PSNR", ".2f"),
                 ("fd", "FD", ".3f"), ("render_iou", "renderIoU", ".3f"), ("seconds", "seconds", ".0f")]


# -----------------------------------------------------------------------------
# distances between two sets of samples


def frechet_distance(feats_a, feats_b):
    """Frechet distance between Gaussians fitted to two (N, D) feature sets:
        ||mu_a - mu_b||^2 + tr(C_a) + tr(C_b) - 2 tr((C_a C_b)^(1/2)).
    Needs at least 2 samples per set (a covariance divides by N - 1); with N <= D the covariances are
    rank-deficient and FD is biased upward, so use N well above D when comparing numbers."""
    if feats_a.dim() != 2 or feats_b.dim() != 2 or feats_a.shape[1] != feats_b.shape[1]:
        fail(f"FD compares two (N, D) feature sets of the same D, got {tuple(feats_a.shape)} and {tuple(feats_b.shape)}")
    if min(len(feats_a), len(feats_b)) < 2:
        fail(f"FD needs at least 2 samples per set to estimate a covariance, got {len(feats_a)} and {len(feats_b)}")
    a, b = feats_a.detach().cpu().double(), feats_b.detach().cpu().double()  # float64: traces cancel
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        fail("FD got NaN or inf features: the images being scored are not finite (did training diverge?)")
    cov_a, cov_b = torch.atleast_2d(torch.cov(a.T)), torch.atleast_2d(torch.cov(b.T))
    # no scipy.linalg.sqrtm: C_a C_b has the same eigenvalues as the symmetric PSD matrix
    # sqrt(C_a) C_b sqrt(C_a), so tr((C_a C_b)^(1/2)) is the sum of the square roots of its eigenvalues.
    # Round-off makes tiny eigenvalues slightly negative; they are zero in exact arithmetic.
    eigvals, eigvecs = torch.linalg.eigh(cov_a)
    sqrt_a = eigvecs @ torch.diag(eigvals.clamp_min(0).sqrt()) @ eigvecs.T
    tr_covmean = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp_min(0).sqrt().sum()
    fd = (a.mean(0) - b.mean(0)).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * tr_covmean
    return max(fd.item(), 0.0)  # a distance: round-off below zero means zero


def precision_recall(real, fake, k=3):
    """Improved precision and recall (Kynkaanniemi et al. 2019) of two (N, D) feature sets. Each set's
    manifold is the union of balls around its points, each reaching to the point's k-th nearest neighbour
    in its own set. Precision: the share of fake points inside the real manifold (are the samples
    realistic?); recall: the share of real points inside the fake manifold (do the samples cover the
    data?). FD mixes the two; a sampler that draws only one class well has precision but no recall."""
    real, fake = real.detach().cpu().double(), fake.detach().cpu().double()

    def radii(points):  # the k-th nearest neighbour, not counting the point itself (distance 0)
        return torch.cdist(points, points).kthvalue(k + 1, dim=1).values

    def covered(points, centres, centre_radii):
        return (torch.cdist(points, centres) <= centre_radii).any(1).double().mean().item()

    return covered(fake, real, radii(real)), covered(real, fake, radii(fake))


# -----------------------------------------------------------------------------
# the evaluator: a small CNN trained here, whose penultimate layer gives the features for FD


class Evaluator(nn.Module):
    """(N, C, H, W) image -> 128 features -> class logits and predicted generative factors.
    Strided convs then a flatten, not global pooling: position is one of the factors, and pooling
    would throw away where the shape is. Factor targets are standardised with stored statistics."""

    def __init__(self, in_channels, image_size, num_classes, num_factors, width=32, feature_dim=128):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),        # H/2
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),    # H/4
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),    # H/8
            nn.Flatten(), nn.Linear(2 * width * math.ceil(image_size / 8) ** 2, feature_dim), nn.SiLU())
        self.classifier = nn.Linear(feature_dim, num_classes)
        self.factor_head = nn.Linear(feature_dim, num_factors)  # 0 outputs for data without factors
        self.register_buffer("factor_mean", torch.zeros(num_factors))
        self.register_buffer("factor_std", torch.ones(num_factors))

    def forward(self, x):
        features = self.body(x)                                                     # (N, 128)
        factors = self.factor_head(features) * self.factor_std + self.factor_mean   # (N, num_factors)
        return features, self.classifier(features), factors


@torch.no_grad()
def evaluate(net, images, batch_size=500):
    """Run the evaluator over images in eval mode, batch by batch: (features, logits, factors) on cpu."""
    device = next(net.eval().parameters()).device
    outputs = [net(batch.to(device).float()) for batch in images.split(batch_size)]
    return [torch.cat([out[k] for out in outputs]).cpu() for k in range(3)]


def features(net, images, batch_size=500):
    """(N, C, H, W) images in [-1, 1] -> (N, 128) float features, the space FD is measured in."""
    return evaluate(net, images, batch_size)[0]


def train_evaluator(train, val, image_shape, num_classes, steps=400, batch_size=128, lr=2e-3, seed=0, device="cpu",
                    augment=None, checks=10):
    """Train the evaluator on (images, labels, factors) tensors: cross-entropy on the class plus the MSE
    of the standardised factors; everything random comes from `seed`, so every FD is the same on every run.
    On small data a CNN can memorise its images, so: the best of `checks` weights on the validation loss
    is kept (early stopping), and data without factors (folders, mnist, cifar10) gets random shifts of up
    to 1/16 of the side (a shape's factors include its position). Returns (net, info: validation accuracy,
    the kept step and, on the shapes, the factors' R^2)."""
    (images, labels, factors), t0 = train, time.time()
    augment = factors.shape[1] == 0 if augment is None else augment
    torch.manual_seed(seed)
    net = Evaluator(image_shape[0], image_shape[1], num_classes, factors.shape[1]).to(device)
    if factors.shape[1]:
        net.factor_mean.copy_(factors.mean(0))
        net.factor_std.copy_(factors.std(0).clamp_min(1e-6))

    def loss_of(x, y, f):
        _, logits, predicted = net(x.to(device))
        loss = F.cross_entropy(logits, y.to(device))
        if factors.shape[1]:  # compared in standardised units, so every factor weighs the same
            loss = loss + F.mse_loss((predicted - net.factor_mean) / net.factor_std,
                                     (f.to(device) - net.factor_mean) / net.factor_std)
        return loss

    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
    order, shifts = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    best = (math.inf, 0, None)  # (validation loss, step, weights)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = get_lr(step, lr, steps // 20, steps, lr / 10)
        idx = torch.randint(len(images), (batch_size,), generator=order)
        x = shift_images(images[idx], image_shape[1] // 16, shifts) if augment else images[idx]
        loss_of(x, labels[idx], factors[idx]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % max(1, steps // checks) == 0 or step + 1 == steps:  # early stopping on val
            with torch.no_grad():  # on at most 2,000 validation images, in one batch
                val_loss = loss_of(*[t[:2000] for t in val]).item()
            if val_loss < best[0]:
                best = (val_loss, step + 1, {k: v.clone() for k, v in net.state_dict().items()})
    net.load_state_dict(best[2])
    _, logits, predicted = evaluate(net, val[0])
    info = {"accuracy": (logits.argmax(1) == val[1]).float().mean().item(), "kept_step": best[1],
            "augment": augment, "train_seconds": time.time() - t0}
    if factors.shape[1]:
        # R^2 = 1 - (error variance / factor variance), per factor. A circle looks the same at every angle,
        # so for the rotation factors the best possible R^2 is about 2/3 (circles are a third of the data)
        r2 = 1 - (predicted - val[2]).pow(2).mean(0) / val[2].var(0)
        info["factor_r2"] = dict(zip(FACTOR_NAMES, r2.tolist()))
    return net, info


def get_evaluator(out_dir, train_set, val_set, image_shape, num_classes, data_config, device="cpu", steps=400, seed=0):
    """The evaluator cached in out_dir/evaluator.pt, retrained when its key (the data options in `data_config`,
    the images, steps, seed, recipe) differs. Returns (net in eval mode, info: accuracy, factor_r2, config)."""
    path = os.path.join(out_dir, "evaluator.pt")
    num_factors = train_set[0][2].numel()
    config = {**{k: data_config.get(k) for k in ("data", "data_dir", "data_seed", "image_size", "channels")},
              "num_train": min(len(train_set), 20_000), "image_shape": list(image_shape), "num_classes": num_classes,
              "num_factors": num_factors, "steps": steps, "seed": seed,
              "recipe": "early stopping on val" + (", shifts" if num_factors == 0 else "")}  # train_evaluator's
    if os.path.isfile(path):
        state = load_checkpoint(path, "evaluator", f"rm {path} && " + command("distance.py", "--out_dir", out_dir))
        if state["config"] == config:
            net = Evaluator(image_shape[0], image_shape[1], num_classes, num_factors)
            net.load_state_dict(state["model"])
            return net.to(device).eval(), state["info"]
        print(f"{path} was trained for {state['config']}; retraining it for {config}")
    print(f"training the evaluator ({steps} steps, seed {seed}) ...")
    net, info = train_evaluator(load_split(train_set, 20_000), load_split(val_set), image_shape, num_classes,
                                steps=steps, seed=seed, device=device)
    info["config"] = config
    save_checkpoint({"kind": "evaluator", "config": config, "info": info, "model": net.state_dict()}, path)
    return net.eval(), info


# -----------------------------------------------------------------------------
# scoring a generator's samples (sample.py --eval)


def score_samples(samples, asked, ae, ae_state, latents, out_dir, device="cpu", eval_steps=400, seed=0,
                  batch_size=256, split="val"):
    """Score samples (`asked`: each one's label, or None) against the `split` images (val while choosing, test
    for final figures), next to rows that put the numbers in context: one Gaussian fitted to the latents (the
    trivial prior the DiT must beat), reconstructions of the other held-out split (the best any prior could do
    with this decoder), and that split itself (the floor: real images the evaluator never trained on either; its
    FD is the score's sampling noise). Every row is unpaired with the reference and gets FD, its mean term (moved
    by a class drawn too often), precision, recall, and on the shapes render_iou against the class asked (or seen)."""
    c = ae_state["config"]
    train_set, val_set, test_set, image_shape, _ = get_dataset(c["data"], c["data_dir"], c["image_size"],
                                                               c["channels"], c["download"], c.get("data_seed", 0))
    (images, _, factors), floor = map(load_split, (val_set, test_set) if split == "val" else (test_set, val_set))
    evaluator, info = get_evaluator(out_dir, train_set, val_set, image_shape, ae_state["num_classes"], c,
                                    device, steps=eval_steps, seed=0)
    n, decode = len(samples), lambda z: torch.cat([ae.decode(b.to(device)).clamp(-1, 1).cpu() for b in z.split(batch_size)])
    with torch.no_grad():
        # the other held-out split, reconstructed: unpaired with the reference images, like every other row
        # (reconstructions of the reference images themselves would match them image for image and score
        # below the floor: on a few hundred images FD is mostly the sampling noise that pairing removes)
        recons = decode(torch.cat([ae.encode(x.to(device))[0] for x in floor[0].split(batch_size)]))
        generator = torch.Generator().manual_seed(seed)  # the posterior samples and the Gaussian's draws
        z = (latents["mean"] + latents["std"] * torch.randn(latents["std"].shape, generator=generator)).flatten(1)
        ridge = 1e-6 * torch.eye(z.shape[1], dtype=torch.float64)  # keeps the covariance positive definite
        torch.manual_seed(seed)
        gaussian = torch.distributions.MultivariateNormal(z.double().mean(0), torch.cov(z.double().T) + ridge)
        gaussian_images = decode(gaussian.sample((n,)).float().view(n, *latents["mean"].shape[1:]))
    gaussian_seen = evaluate(evaluator, gaussian_images)[1].argmax(1)  # nothing was asked of it
    rows = {"DiT samples": (samples, asked), "Gaussian prior": (gaussian_images, gaussian_seen),
            "reconstructions": (recons, floor[1]), f"real ({'test' if split == 'val' else 'val'})": floor[:2]}
    real_features, scores, shapes = features(evaluator, images), {}, factors.shape[1] > 0
    for name, (row_images, row_labels) in rows.items():  # every row against the same features: comparable
        feats = features(evaluator, row_images)
        scores[name] = {"count": len(row_images), "fd": frechet_distance(feats, real_features),
                        "fd_mean_term": (feats.mean(0) - real_features.mean(0)).double().pow(2).sum().item()}
        scores[name]["precision"], scores[name]["recall"] = precision_recall(real_features, feats)
        if shapes:  # with the known classes and factors: does each image look like its ideal shape?
            row_labels = evaluate(evaluator, row_images)[1].argmax(1) if row_labels is None else row_labels
            iou = render_iou(row_images, row_labels)
            scores[name]["render_iou"] = iou.mean().item()
            scores[name]["render_iou_per_class"] = [iou[row_labels == k].mean().item() for k in range(3)]
    floor_name = list(rows)[-1]
    metrics = {"split": split, "fd": scores["DiT samples"]["fd"], "fd_gaussian": scores["Gaussian prior"]["fd"],
               "fd_recon": scores["reconstructions"]["fd"], "fd_real": scores[floor_name]["fd"],
               "num_samples": n, "num_reference": len(images), "val_psnr": ae_state.get("val_psnr"),
               "ae_stage": ae_state["stage"], "scores": scores,
               "evaluator": {"network": "distance.Evaluator (4 convs + linear, 128-d features), trained offline here",
                             "accuracy": info["accuracy"], "factor_r2": info.get("factor_r2"), "steps": eval_steps}}
    if asked is not None:  # a conditional prior: does the evaluator see the class each sample was asked for?
        seen = evaluate(evaluator, samples)[1].argmax(1)
        metrics["class_match"] = (seen == asked).float().mean().item()
        metrics["class_shares"] = (torch.bincount(seen, minlength=ae_state["num_classes"]) / n).tolist()
    return metrics


# -----------------------------------------------------------------------------
# the script: the capacity curve of one autoencoder's encoder


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--out_dir", default="out", help="where ae.pt is; evaluator.pt and distance.json go here")
    parser.add_argument("--ae", help="autoencoder checkpoint to score (default: out_dir/ae.pt)")
    parser.add_argument("--split", default="val", choices=["val", "test"], help="the images the probes are scored on")
    parser.add_argument("--widths", default="0.125,0.25,0.5,1,aux", help="probe classes G: widths; aux = stage 1's class")
    parser.add_argument("--steps", type=int, default=300, help="training steps of each probe (with --patience: at most)")
    parser.add_argument("--patience", type=int, default=0, help="0: --steps each; N: to convergence (see capacity_curve)")
    parser.add_argument("--batch_size", type=int, default=32, help="probe training batch")
    parser.add_argument("--lr", type=float, default=2e-3, help="probe peak learning rate")
    parser.add_argument("--num_train", type=int, default=20_000, help="training images the probes learn from")
    parser.add_argument("--eval_steps", type=int, default=400, help="training steps of the evaluator")
    parser.add_argument("--seed", type=int, default=0, help="seeds the probes and the evaluator")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, mps")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="probe training precision")
    args = parser.parse_args()
    try:  # "aux" is resolved once the checkpoint's config is known
        widths = [w if w == "aux" else float(w) for w in args.widths.replace(" ", "").split(",")]
    except ValueError:
        fail(f"--widths takes comma-separated widths and aux, such as 0.25,0.5,1,aux; got '{args.widths}'")
    if min(args.steps, args.batch_size, args.lr, args.num_train, args.eval_steps, args.patience + 1, *[w for w in widths if w != "aux"]) <= 0:
        fail("--widths, --steps, --batch_size, --lr, --num_train and --eval_steps must be positive, --patience >= 0")
    ae_path = args.ae or os.path.join(args.out_dir, "ae.pt")
    check_device(args.device)
    check_out_dir(args.out_dir, True)  # evaluator.pt and the json go here, even with --ae elsewhere
    ae_dir = os.path.dirname(ae_path) or "."
    ae, state = load_autoencoder(ae_path, command("train_ae.py", "--stage", "1", "--out_dir", ae_dir) + " && "
                                 + command("train_ae.py", "--stage", "2", "--out_dir", ae_dir), args.device)
    c = state["config"]
    train_set, val_set, test_set, image_shape, num_classes = get_dataset(
        c["data"], c["data_dir"], c["image_size"], c["channels"], c["download"], c.get("data_seed", 0))
    train_images = load_split(train_set, args.num_train)[0]
    eval_images, eval_labels, factors = load_split(val_set if args.split == "val" else test_set)
    floor_images, floor_labels, _ = load_split(test_set if args.split == "val" else val_set)
    evaluator, info = get_evaluator(args.out_dir, train_set, val_set, image_shape, num_classes, c,
                                    args.device, steps=args.eval_steps, seed=args.seed)
    print(f"evaluator: validation accuracy {info['accuracy']:.3f}"
          + "".join(f", R^2 {k} {v:.3f}" for k, v in info.get("factor_r2", {}).items()))
    # the floor of every unpaired score: the other held-out split against this one. A decoder that
    # reproduced the data distribution exactly would score about this, not zero
    reference = {"width": "real", "fd": frechet_distance(features(evaluator, floor_images), features(evaluator, eval_images))}
    if factors.shape[1]:
        reference["render_iou"] = render_iou(floor_images, floor_labels).mean().item()
    budget = f"to convergence (patience {args.patience}, <= {args.steps} steps)" if args.patience else f"{args.steps} steps"
    print(f"capacity curve of {ae_path} (stage {state.get('stage', '?')}): probes train {budget}")
    print(table_line("", None, CURVE_COLUMNS) + "\n" + table_line("real images", reference, CURVE_COLUMNS))
    # each class is (width, dropout); aux is the auxiliary decoder of stage 1 (a joint run's config holds the default)
    aux = (c.get("aux_width", 1.0), c.get("aux_dropout", 0.0))
    classes = list(dict.fromkeys(aux if w == "aux" else (w, 0.0) for w in widths))
    rows = capacity_curve(lambda x: ae.encode(x)[0], train_images, eval_images, classes, args.steps,  # e(x) = posterior mean
                          args.batch_size, args.lr, args.seed, c["ch"], c["ch_mult"], c["num_res_blocks"], evaluator,
                          eval_labels if factors.shape[1] else None, args.device, args.patience, dtype=args.dtype)
    # out_dir/distance.json for ae.pt; another checkpoint gets its own file, e.g. distance_ae_stage1.json
    name = "" if args.ae is None else "_" + os.path.splitext(os.path.basename(args.ae))[0]
    out_path = os.path.join(args.out_dir, f"distance{name}.json")
    with open(out_path, "w") as f:
        json.dump({"ae": ae_path, "ae_stage": state.get("stage"), "config": vars(args), "evaluator": info,
                   "reference": reference, "rows": rows}, f, indent=2)
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
