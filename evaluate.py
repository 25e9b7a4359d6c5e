"""
Judging images without downloads: render IoU (does a shape look like the ideal shape of its class),
a small evaluator CNN trained here once, the Frechet distance (FD) and precision / recall in its
features, and the scoring of a prior's samples against held-out images (sample.py --eval). FD here
is not FID: the features are this evaluator's, so numbers are only comparable under one
`evaluator.pt`. How far these scores can be trusted is measured in assets/RESULTS.md ("How far can
the evaluator and FD be trusted?").

The evaluator learns the class labels (and, on the built-in shapes, the known factors), so it
needs labelled data: on one unlabelled class it would learn nothing, and it refuses to score.
"""
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import (FACTOR_NAMES, INTENSITY_RANGE, POSITION_RANGE, SCALE_RANGE, dataset_of,
                  load_checkpoint, load_split, render_shapes, save_checkpoint)
from plumbing import command, fail, get_lr

# -----------------------------------------------------------------------------
# how much an image looks like the shape it should be (the built-in data)

# the area of each shape at scale 1 in the [-1, 1] square: pi r^2, (1.6)^2, 3 sqrt(3) 0.6^2
SHAPE_AREA = torch.tensor([math.pi, 1.6 ** 2, 3 * math.sqrt(3) * 0.6 ** 2])


def render_iou(images, labels, angles=36):
    """How much each image looks like the ideal shape of class `labels` (the class asked for, or
    the true one), from 0 to 1. The image is cut at half its brightness into a mask; the ideal
    shape gets the mask's centre, area and brightness and the best of `angles` rotations of its
    symmetry period, is cut the same way, and the score is the intersection over union of the two
    masks. A dented, blurred or wrong-class image scores lower; isolated specks are ignored; an
    image whose fitted position, size or brightness lies outside the data's range (a blank frame,
    a frame-filling blob) scores 0. images (N, 1, S, S) in [-1, 1], labels (N,) -> (N,)."""
    size = images.shape[-1]
    # the brightness of the shape's fully covered inside: its 8th brightest pixel, so that a few
    # stray bright pixels cannot set it (the smallest shape has about 30 inside pixels at 32x32)
    intensity = (images.flatten(1).topk(8, dim=1).values[:, -1] + 1) / 2
    drawn = images > (intensity - 1).view(-1, 1, 1, 1)  # cut at half of it, on the [-1, 1] scale
    # a speck is not the shape: a drawn pixel none of whose 8 neighbours is drawn is left out
    neighbours = F.conv2d(drawn.float(), torch.ones(1, 1, 3, 3), padding=1) - drawn.float()
    drawn = drawn & (neighbours > 0)
    axis = (torch.arange(size) + 0.5) / size * 2 - 1
    count = drawn.flatten(1).sum(1).clamp_min(1)
    x = (drawn * axis.view(1, 1, 1, -1)).flatten(1).sum(1) / count  # the mask's centre
    y = (drawn * axis.view(1, 1, -1, 1)).flatten(1).sum(1) / count
    scale = (count * (2 / size) ** 2 / SHAPE_AREA[labels]).sqrt()  # the scale of that area
    # the data's ranges, with a margin for the error of fitting them from a mask
    plausible = (x.abs() <= POSITION_RANGE + 0.1) & (y.abs() <= POSITION_RANGE + 0.1)
    plausible &= (scale >= 0.75 * SCALE_RANGE[0]) & (scale <= 1.25 * SCALE_RANGE[1])
    plausible &= intensity >= INTENSITY_RANGE[0] - 0.1
    best = torch.zeros(len(images))
    for angle in torch.arange(angles) * 2 * math.pi / angles:
        cos, sin = angle.cos().expand_as(x), angle.sin().expand_as(x)
        factors = torch.stack([x, y, scale, cos, sin, intensity], 1)
        ideal = render_shapes(labels, factors, size) > (intensity - 1).view(-1, 1, 1, 1)
        union = (drawn | ideal).flatten(1).sum(1).clamp_min(1)
        best = torch.maximum(best, (drawn & ideal).flatten(1).sum(1) / union)
    return best * plausible


# -----------------------------------------------------------------------------
# distances between two sets of samples


def frechet_distance(feats_a, feats_b):
    """Frechet distance between Gaussians fitted to two (N, D) feature sets:
        ||mu_a - mu_b||^2 + tr(C_a) + tr(C_b) - 2 tr((C_a C_b)^(1/2)).
    Needs at least 2 samples per set (a covariance divides by N - 1); with N <= D the covariances
    are rank-deficient and FD is biased upward, so use N well above D when comparing numbers."""
    if feats_a.dim() != 2 or feats_b.dim() != 2 or feats_a.shape[1] != feats_b.shape[1]:
        fail(f"FD compares two (N, D) feature sets of the same D, got {tuple(feats_a.shape)} "
             f"and {tuple(feats_b.shape)}")
    if min(len(feats_a), len(feats_b)) < 2:
        fail(f"FD needs at least 2 samples per set to estimate a covariance, "
             f"got {len(feats_a)} and {len(feats_b)}")
    a = feats_a.detach().cpu().double()  # float64: the traces below nearly cancel
    b = feats_b.detach().cpu().double()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        fail("FD got NaN or inf features: the images being scored are not finite "
             "(did training diverge?)")
    cov_a = torch.atleast_2d(torch.cov(a.T))
    cov_b = torch.atleast_2d(torch.cov(b.T))
    # no scipy.linalg.sqrtm: C_a C_b has the same eigenvalues as the symmetric PSD matrix
    # sqrt(C_a) C_b sqrt(C_a), so tr((C_a C_b)^(1/2)) is the sum of the square roots of its
    # eigenvalues. Round-off makes tiny eigenvalues slightly negative; they are zero.
    eigvals, eigvecs = torch.linalg.eigh(cov_a)
    sqrt_a = eigvecs @ torch.diag(eigvals.clamp_min(0).sqrt()) @ eigvecs.T
    tr_covmean = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp_min(0).sqrt().sum()
    mean_term = (a.mean(0) - b.mean(0)).pow(2).sum()
    fd = mean_term + cov_a.trace() + cov_b.trace() - 2 * tr_covmean
    return max(fd.item(), 0.0)  # a distance: round-off below zero means zero


def precision_recall(real, fake, k=3):
    """Improved precision and recall (Kynkaanniemi et al. 2019) of two (N, D) feature sets. Each
    set's manifold is the union of balls around its points, each reaching to the point's k-th
    nearest neighbour in its own set. Precision: the share of fake points inside the real manifold
    (are the samples realistic?); recall: the share of real points inside the fake manifold (do
    the samples cover the data?). FD mixes the two."""
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
            nn.Flatten(),
            nn.Linear(2 * width * math.ceil(image_size / 8) ** 2, feature_dim), nn.SiLU())
        self.classifier = nn.Linear(feature_dim, num_classes)
        self.factor_head = nn.Linear(feature_dim, num_factors)  # 0 outputs without known factors
        self.register_buffer("factor_mean", torch.zeros(num_factors))
        self.register_buffer("factor_std", torch.ones(num_factors))

    def forward(self, x):
        features = self.body(x)                                                    # (N, 128)
        factors = self.factor_head(features) * self.factor_std + self.factor_mean  # (N, factors)
        return features, self.classifier(features), factors


def float32(device):
    """The evaluator always computes in float32, whatever autocast the caller has switched on:
    its features must not depend on the device or on the sampler's precision."""
    return torch.autocast("cuda" if str(device).startswith("cuda") else "cpu", enabled=False)


@torch.no_grad()
def evaluate(net, images, batch_size=500):
    """Run the evaluator over images in eval mode, batch by batch: (features, logits, factors)."""
    device = next(net.eval().parameters()).device
    with float32(device):
        outputs = [net(batch.to(device).float()) for batch in images.split(batch_size)]
    return [torch.cat([out[k] for out in outputs]).cpu() for k in range(3)]


def features(net, images, batch_size=500):
    """(N, C, H, W) images in [-1, 1] -> (N, 128) float features, the space FD is measured in."""
    return evaluate(net, images, batch_size)[0]


def shift_images(images, max_shift, generator):
    """Shift each image by its own random whole number of pixels in [-max_shift, max_shift] along
    each axis, repeating the border pixels into the gap: an augmentation that keeps a class a class."""
    n, size = len(images), images.shape[-1]
    pixels = torch.randint(-max_shift, max_shift + 1, (n, 2), generator=generator).float()
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, :, 2] = -2 * pixels / size  # grid coordinates span 2 over `size` pixels
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="nearest", padding_mode="border", align_corners=False)


def train_evaluator(train, val, image_shape, num_classes, steps=400, batch_size=128, lr=2e-3,
                    seed=0, device="cpu", augment=None, checks=10):
    """Train the evaluator on (images, labels, factors) tensors: cross-entropy on the class plus
    the MSE of the standardised factors, in float32; everything random comes from `seed`. On small
    data a CNN can memorise its images, so the best of `checks` weights on the validation loss is
    kept (early stopping), and data without known factors (folders, mnist, cifar10) gets random
    shifts of up to 1/16 of the side (a shape's factors include its position). Returns (net, info:
    validation accuracy, the kept step and, on the shapes, the factors' R^2)."""
    images, labels, factors = train
    start = time.time()
    augment = factors.shape[1] == 0 if augment is None else augment
    torch.manual_seed(seed)
    net = Evaluator(image_shape[0], image_shape[1], num_classes, factors.shape[1]).to(device)
    if factors.shape[1]:
        net.factor_mean.copy_(factors.mean(0))
        net.factor_std.copy_(factors.std(0).clamp_min(1e-6))

    def standardise(values):  # factors in standardised units, so that every factor weighs the same
        return (values - net.factor_mean) / net.factor_std

    def loss_of(x, y, f):
        _, logits, predicted = net(x.to(device))
        loss = F.cross_entropy(logits, y.to(device))
        if factors.shape[1]:
            loss = loss + F.mse_loss(standardise(predicted), standardise(f.to(device)))
        return loss

    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
    order = torch.Generator().manual_seed(seed)
    shifts = torch.Generator().manual_seed(seed + 1)
    best_loss, best_step, best_weights = math.inf, 0, None
    with float32(device):
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = get_lr(step, lr, steps // 20, steps, lr / 10)
            idx = torch.randint(len(images), (batch_size,), generator=order)
            x = shift_images(images[idx], image_shape[1] // 16, shifts) if augment else images[idx]
            loss_of(x, labels[idx], factors[idx]).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if (step + 1) % max(1, steps // checks) == 0 or step + 1 == steps:  # early stopping
                with torch.no_grad():  # on at most 2,000 validation images, in one batch
                    val_loss = loss_of(*[t[:2000] for t in val]).item()
                if val_loss < best_loss:
                    best_weights = {k: v.clone() for k, v in net.state_dict().items()}
                    best_loss, best_step = val_loss, step + 1
    net.load_state_dict(best_weights)

    _, logits, predicted = evaluate(net, val[0])
    info = {"accuracy": (logits.argmax(1) == val[1]).float().mean().item(),
            "kept_step": best_step, "augment": augment, "train_seconds": time.time() - start}
    if factors.shape[1]:
        # R^2 = 1 - error variance / factor variance, per factor. A circle looks the same at every
        # angle, so for the rotation factors the best possible R^2 is about 2/3
        r2 = 1 - (predicted - val[2]).pow(2).mean(0) / val[2].var(0)
        info["factor_r2"] = dict(zip(FACTOR_NAMES, r2.tolist()))
    return net, info


EVALUATOR_SEED = 0  # one evaluator per folder: every score in it is measured in the same features


def get_evaluator(out_dir, train_set, val_set, image_shape, num_classes, data_config,
                  device="cpu", steps=400):
    """The evaluator cached in out_dir/evaluator.pt, retrained when its key (the data options in
    `data_config`, the number of images, steps, recipe) differs. Returns (net in eval mode, info:
    accuracy, factor_r2, config). Its weights are chosen on the validation split, which is also
    the default reference of the scores; the test split stays untouched by every model."""
    if num_classes <= 1:
        fail("the evaluator learns the class labels, and this data has a single unlabelled "
             "class: score samples with an external FID suite instead (sample.py --save_npz)")
    path = os.path.join(out_dir, "evaluator.pt")
    num_factors = train_set[0][2].numel()
    data_keys = ("data", "data_dir", "data_seed", "image_size", "channels", "rotation")
    config = {**{k: data_config.get(k) for k in data_keys},
              "num_train": min(len(train_set), 20_000), "image_shape": list(image_shape),
              "num_classes": num_classes, "num_factors": num_factors, "steps": steps,
              "seed": EVALUATOR_SEED,
              "recipe": "early stopping on val" + (", shifts" if num_factors == 0 else "")}
    if os.path.isfile(path):
        remake = f"rm {path} && " + command("distance.py", "--out_dir", out_dir)
        state = load_checkpoint(path, "evaluator", remake)
        if state["config"] == config:
            net = Evaluator(image_shape[0], image_shape[1], num_classes, num_factors)
            net.load_state_dict(state["model"])
            return net.to(device).eval(), state["info"]
        print(f"{path} was trained for {state['config']}; retraining it for {config}")
    print(f"training the evaluator ({steps} steps) ...")
    net, info = train_evaluator(load_split(train_set, 20_000), load_split(val_set), image_shape,
                                num_classes, steps=steps, seed=EVALUATOR_SEED, device=device)
    info["config"] = config
    state = {"kind": "evaluator", "config": config, "info": info, "model": net.state_dict()}
    save_checkpoint(state, path)
    return net.eval(), info


# -----------------------------------------------------------------------------
# scoring a generator's samples (sample.py --eval)


def score_rows(evaluator, rows, reference, shapes):
    """Every row (name -> (images, labels or None)) against the same reference images, so their
    numbers compare: FD, its mean term (moved by a class drawn too often), precision, recall, and
    on the shapes render IoU against the class asked (or, without labels, the class seen)."""
    reference_features = features(evaluator, reference)
    scores = {}
    for name, (images, labels) in rows.items():
        feats = features(evaluator, images)
        mean_term = (feats.mean(0) - reference_features.mean(0)).double().pow(2).sum().item()
        precision, recall = precision_recall(reference_features, feats)
        scores[name] = {"count": len(images), "fd": frechet_distance(feats, reference_features),
                        "fd_mean_term": mean_term, "precision": precision, "recall": recall}
        if shapes:  # the built-in shapes: each image against its ideal shape
            if labels is None:
                labels = evaluate(evaluator, images)[1].argmax(1)
            iou = render_iou(images, labels)
            scores[name]["render_iou"] = iou.mean().item()
            # a class no image was asked for has no score (null in metrics.json), not NaN
            per_class = [iou[labels == k].mean().item() if (labels == k).any() else None
                         for k in range(3)]
            scores[name]["render_iou_per_class"] = per_class
    return scores


def score_samples(samples, asked, ae, ae_state, latents, out_dir, device="cpu", eval_steps=400,
                  seed=0, batch_size=256, split="val"):
    """Score samples (`asked`: each one's label, or None) against the `split` images (val while
    choosing, test for final figures), next to rows that put the numbers in context: a Gaussian
    fitted to the latents (the trivial prior the DiT must beat), reconstructions of the other
    held-out split (the best any prior could do with this decoder), and that split itself (the
    floor: real images the evaluator never trained on; its FD is the score's sampling noise).
    Every row is a different set of images from the reference: unpaired, like the samples.
    `latents` must be this autoencoder's (sample.py checks their fingerprint)."""
    train_set, val_set, test_set, image_shape, num_classes = dataset_of(ae_state["config"])
    reference_set, other_set = (val_set, test_set) if split == "val" else (test_set, val_set)
    reference, _, reference_factors = load_split(reference_set)
    other_images, other_labels, _ = load_split(other_set)
    evaluator, info = get_evaluator(out_dir, train_set, val_set, image_shape, num_classes,
                                    ae_state["config"], device, steps=eval_steps)

    def decode(z):
        parts = [ae.decode(part.to(device)).float().clamp(-1, 1) for part in z.split(batch_size)]
        return torch.cat(parts).cpu()

    with torch.no_grad():
        # the other held-out split, reconstructed from its posterior means
        means = [ae.encode(x.to(device))[0] for x in other_images.split(batch_size)]
        recons = decode(torch.cat(means))
        # a Gaussian fitted to posterior samples of the training latents, in float64
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(latents["std"].shape, generator=generator)
        z = (latents["mean"] + latents["std"] * noise).flatten(1).double()
        ridge = 1e-6 * torch.eye(z.shape[1], dtype=torch.float64)  # keeps it positive definite
        torch.manual_seed(seed)
        gaussian = torch.distributions.MultivariateNormal(z.mean(0), torch.cov(z.T) + ridge)
        n = len(samples)
        gaussian_latents = gaussian.sample((n,)).float().view(n, *latents["mean"].shape[1:])
        gaussian_images = decode(gaussian_latents)

    other_split = "test" if split == "val" else "val"
    other_name = f"real ({other_split})"
    rows = {"DiT samples": (samples, asked), "Gaussian prior": (gaussian_images, None),
            "reconstructions": (recons, other_labels), other_name: (other_images, other_labels)}
    scores = score_rows(evaluator, rows, reference, shapes=reference_factors.shape[1] > 0)
    metrics = {"split": split, "fd": scores["DiT samples"]["fd"],
               "fd_gaussian": scores["Gaussian prior"]["fd"],
               "fd_recon": scores["reconstructions"]["fd"], "fd_real": scores[other_name]["fd"],
               "num_samples": n, "num_reference": len(reference),
               "val_psnr": ae_state.get("val_psnr"), "ae_stage": ae_state["stage"],
               "scores": scores,
               "evaluator": {"network": "evaluate.Evaluator: 4 convs + linear, 128-d features",
                             "accuracy": info["accuracy"], "factor_r2": info.get("factor_r2"),
                             "steps": eval_steps}}
    if asked is not None:  # a conditional prior: does the evaluator see the class asked for?
        seen = evaluate(evaluator, samples)[1].argmax(1)
        metrics["class_match"] = (seen == asked).float().mean().item()
        metrics["class_shares"] = (torch.bincount(seen, minlength=num_classes) / n).tolist()
    return metrics
