"""
The data, and the files that carry it from one script to the next: the datasets, whole splits as
tensors, step-indexed batches and random streams, a dataset's latents, and the checkpoints
(autoencoder, latents, prior), written atomically and read back safely.

Datasets (every item is `(image, label, factors)`, image a float tensor in [-1, 1], (C, H, W)):
  shapes   built in, no files: anti-aliased circles, squares and triangles with known generative
           factors (position x/y, scale, rotation, intensity), so samples can be checked against
           the ideal shape they claim to be (`evaluate.render_iou`)
  mnist    torchvision MNIST from files you already have in --data_dir (or opt in with --download)
  cifar10  torchvision CIFAR-10, the same way
  folder   any directory of images: one sub-folder per class (torchvision ImageFolder), or the
           images themselves with no sub-folders (one unlabelled class)
"""
import hashlib
import math
import os

import numpy as np
import torch

from model import Autoencoder, DiT
from plumbing import fail, positive_int, unit_interval

# -----------------------------------------------------------------------------
# the built-in dataset: procedural shapes

SHAPE_NAMES = ["circle", "square", "triangle"]
# rotation only means something up to the shape's symmetry, so it is drawn as a fraction of
# that period and stored as (cos, sin) to keep the factor vector continuous
SYMMETRY = torch.tensor([1.0, 4.0, 3.0])  # circle: any angle; square: 90 degrees; triangle: 120
FACTOR_NAMES = ["x", "y", "scale", "rot_cos", "rot_sin", "intensity"]
POSITION_RANGE = 0.4          # x and y in [-0.4, 0.4] of the [-1, 1] image square
SCALE_RANGE = (0.3, 0.6)      # the circle's radius; squares and triangles of about the same area
INTENSITY_RANGE = (0.4, 1.0)  # the shape's grey level on a black background


class ShapesDataset(torch.utils.data.Dataset):
    """One grey shape on black, drawn from a signed distance function with 1-pixel anti-aliasing.

    Item i is a pure function of (seed, split, i): its factors come from a generator seeded with
    those three numbers, so the 5th image is the same whether the set holds 100 or 20,000 images.
    Splits: train (20,000), val (2,000: every choice of default is made on it), test (2,000:
    final figures only). `rotation` is the fraction of each shape's symmetry period its angle is
    drawn from: 1 any angle, 0 upright (the control without rotation). The whole split is
    rendered once at construction (a few hundred milliseconds).
    """

    def __init__(self, split="train", image_size=32, seed=0, size=None, rotation=1.0):
        split_id = {"train": 0, "test": 1, "val": 2}[split]
        size = size or (20_000 if split == "train" else 2_000)
        # six uniform numbers per item, each from its own generator: item i depends on nothing else
        rows = []
        for i in range(size):
            generator = torch.Generator().manual_seed((seed * 3 + split_id) * 10_000_019 + i)
            rows.append(torch.rand(6, generator=generator))
        u = torch.stack(rows)
        angle = 2 * math.pi * rotation * u[:, 4]  # a fraction of one period, as an angle
        self.labels = (u[:, 0] * len(SHAPE_NAMES)).long()
        # uniform over the ranges above: position, scale, rotation as (cos, sin), intensity
        self.factors = torch.stack([0.8 * u[:, 1] - 0.4, 0.8 * u[:, 2] - 0.4, 0.3 + 0.3 * u[:, 3],
                                    angle.cos(), angle.sin(), 0.4 + 0.6 * u[:, 5]], dim=1)
        batches = [render_shapes(self.labels[s:s + 4096], self.factors[s:s + 4096], image_size)
                   for s in range(0, size, 4096)]
        self.images = torch.cat(batches)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i], self.factors[i]


def render_shapes(labels, factors, image_size):
    """Rasterise a batch of shapes: labels (N,), factors (N, 6) -> images (N, 1, S, S) in [-1, 1]."""
    x, y, scale, rot_cos, rot_sin, intensity = [f.view(-1, 1, 1) for f in factors.T]
    axis = (torch.arange(image_size) + 0.5) / image_size * 2 - 1  # pixel centres in [-1, 1]
    py = axis.view(1, -1, 1) - y  # (N, S, 1)
    px = axis.view(1, 1, -1) - x  # (N, 1, S)
    # the angle on the unit circle is one full turn per symmetry period: divide it back down
    angle = torch.atan2(rot_sin, rot_cos) / SYMMETRY[labels].view(-1, 1, 1)
    qx = px * angle.cos() + py * angle.sin()  # the pixel in the shape's own rotated frame
    qy = -px * angle.sin() + py * angle.cos()
    circle = (px ** 2 + py ** 2).sqrt() - scale
    square = torch.maximum(qx.abs(), qy.abs()) - 0.8 * scale  # about the circle's area
    # an equilateral triangle is the intersection of three half-planes at 120 degrees
    normals = [(math.cos(a), math.sin(a)) for a in math.pi / 2 + 2 * math.pi / 3 * np.arange(3)]
    triangle = torch.stack([qx * nx + qy * ny for nx, ny in normals]).amax(0) - 0.6 * scale
    label = labels.view(-1, 1, 1)
    dist = torch.where(label == 0, circle, torch.where(label == 1, square, triangle))
    # coverage: 1 inside, 0 outside, a linear ramp one pixel wide across the edge (anti-aliasing)
    coverage = (0.5 - dist * image_size / 2).clamp(0, 1)
    return (intensity * coverage * 2 - 1).unsqueeze(1)


# -----------------------------------------------------------------------------
# torchvision datasets, imported lazily so the built-in path never needs torchvision's data code


class WithFactors(torch.utils.data.Dataset):
    """Gives a torchvision dataset the (image, label, factors) items of the built-in one."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        image, label = self.dataset[i]
        return image, torch.tensor(label), torch.zeros(0)  # no known factors


class FlatImageFolder(torch.utils.data.Dataset):
    """The images of one directory, no sub-folders: the usual layout of a user's own pictures.
    They are one unlabelled class (label 0), so the prior trained on them is unconditional."""

    def __init__(self, root, transform):
        from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader
        names = [f for f in os.listdir(root) if f.lower().endswith(IMG_EXTENSIONS)]
        self.paths = sorted(os.path.join(root, f) for f in names)
        self.transform, self.loader, self.classes = transform, default_loader, ["images"]

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.transform(self.loader(self.paths[i])), 0


def image_folder(data_dir, transform):
    """--data folder: one sub-folder per class if there are any (torchvision's ImageFolder), else
    the images in data_dir itself as one class. Returns (dataset, the layout found, in words)."""
    import torchvision
    if not os.path.isdir(data_dir):
        fail(f"--data_dir {data_dir} is not a directory: point it at a folder of images "
             f"(or of class sub-folders)")
    try:
        full = torchvision.datasets.ImageFolder(data_dir, transform=transform)
        return full, f"{len(full.classes)} classes, one per sub-folder"
    except (FileNotFoundError, RuntimeError):  # no sub-folder holds an image: the folder itself
        flat = FlatImageFolder(data_dir, transform)
        if not flat.paths:
            fail(f"no images found in {data_dir} or its sub-folders: add .png/.jpg files, "
                 f"in one sub-folder per class or all in the folder itself")
        return flat, "no class sub-folders: one unlabelled class (the prior will be unconditional)"


def to_rgb(image):
    # a named function, not a lambda: DataLoader workers started with spawn must pickle it
    return image.convert("RGB")


def get_dataset(name, data_dir="data", image_size=32, channels=3, download=False, seed=0,
                rotation=1.0):
    """Returns (train, val, test sets, image shape (C, H, W), number of classes). Models train on
    train; every choice (a default, the evaluator's early stop) is made on val; test only reports
    final figures."""
    if name == "shapes":
        splits = [ShapesDataset(split, image_size, seed, rotation=rotation)
                  for split in ("train", "val", "test")]
        return (*splits, (1, image_size, image_size), len(SHAPE_NAMES))
    if name not in ("mnist", "cifar10", "folder"):
        fail(f"unknown dataset '{name}': choose one of shapes, mnist, cifar10, folder")
    import torchvision
    from torchvision import transforms as T
    if name != "folder":
        channels = 1 if name == "mnist" else 3
    to_tensor = T.Compose([T.Resize(image_size), T.CenterCrop(image_size),
                           T.Grayscale(channels) if channels == 1 else T.Lambda(to_rgb),
                           T.ToTensor(), T.Normalize([0.5] * channels, [0.5] * channels)])
    shape = (channels, image_size, image_size)
    if name == "folder":
        full, layout = image_folder(data_dir, to_tensor)
        if len(full) < 3:
            fail(f"{data_dir} holds {len(full)} image(s): the folder dataset needs at least 3 "
                 f"(train, val, test)")
        if int(os.environ.get("RANK", 0)) == 0:  # said once, not by every DDP process
            print(f"--data folder {data_dir}: {len(full)} images, {layout}")
        # a fixed 10 % of the images (at least one) is the test split, another 10 % validation
        test, train = carve(full, len(full) // 10, seed)
        val, train = carve(train, len(full) // 10, seed)
        return WithFactors(train), WithFactors(val), WithFactors(test), shape, len(full.classes)
    cls = {"mnist": torchvision.datasets.MNIST, "cifar10": torchvision.datasets.CIFAR10}[name]
    # under torchrun only rank 0 downloads; the others wait for it, then read what it wrote
    distributed = download and torch.distributed.is_initialized()
    waits = distributed and torch.distributed.get_rank() > 0
    if waits:
        torch.distributed.barrier()
    try:
        train, test = [cls(data_dir, train=t, transform=to_tensor, download=download and not waits)
                       for t in (True, False)]
    except RuntimeError:
        fail(f"{name} files not found in --data_dir {data_dir}: copy them there or add --download")
    if distributed and not waits:
        torch.distributed.barrier()
    val, train = carve(train, len(train) // 10, seed)  # the official test set stays the test split
    return WithFactors(train), WithFactors(val), WithFactors(test), shape, 10


def carve(dataset, count, seed):
    """(a fixed random slice of `count` items, at least one, the rest): the same on every run."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    count = max(1, count)
    return torch.utils.data.Subset(dataset, order[:count]), torch.utils.data.Subset(dataset,
                                                                                    order[count:])


def load_split(dataset, max_count=None):
    """The first max_count items of a dataset as three tensors: images, labels, factors."""
    count = len(dataset) if max_count is None else min(max_count, len(dataset))
    subset = torch.utils.data.Subset(dataset, range(count))
    images, labels, factors = zip(*torch.utils.data.DataLoader(subset, batch_size=500))
    return torch.cat(images), torch.cat(labels), torch.cat(factors)


# -----------------------------------------------------------------------------
# batches and random draws indexed by step: the same step always gets the same examples and the
# same noise, whatever the process count, so a resumed run needs no saved random state


def step_seed(seed, rank, step):
    """The seed of every random draw of one step on one process (noise, t, dropout). Hashing the
    three numbers together keeps the streams apart: no (rank, step) ever reuses another one's
    draws, and a resumed run re-creates them from the step alone."""
    words = np.random.SeedSequence([seed, rank, step]).generate_state(2, dtype=np.uint32)
    return int(words[0]) << 32 | int(words[1])


class StepSampler:
    """A batch sampler for DataLoader that yields the examples of steps start_step .. max_steps-1.

    The global batch of step s is a slice of a permutation drawn from (seed, epoch), and rank r of
    W processes takes the r-th contiguous piece of it. So the data order needs no state in the
    checkpoint (resume just starts at the saved step), and two processes with batch B together
    see exactly the 2B examples one process with batch 2B would see.
    """

    def __init__(self, num_examples, batch_size, seed, start_step, max_steps, rank=0, world_size=1):
        self.global_batch = batch_size * world_size
        if self.global_batch > num_examples:
            fail(f"global batch {self.global_batch} is larger than the dataset ({num_examples}): "
                 f"lower --batch_size")
        self.n, self.batch_size, self.seed, self.rank = num_examples, batch_size, seed, rank
        self.steps = range(start_step, max_steps)
        self.steps_per_epoch = num_examples // self.global_batch  # drop each epoch's ragged end

    def __len__(self):
        return len(self.steps)

    def __iter__(self):
        epoch, order = None, None
        for step in self.steps:
            if step // self.steps_per_epoch != epoch:  # a new epoch: a new permutation of the data
                epoch = step // self.steps_per_epoch
                generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                order = torch.randperm(self.n, generator=generator)
            start = (step % self.steps_per_epoch) * self.global_batch + self.rank * self.batch_size
            yield order[start:start + self.batch_size].tolist()


def make_loader(dataset, batch_size, seed, start_step, max_steps, rank=0, world_size=1,
                num_workers=0):
    """A DataLoader over the batches of steps start_step .. max_steps - 1 for this rank."""
    sampler = StepSampler(len(dataset), batch_size, seed, start_step, max_steps, rank, world_size)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                       pin_memory=torch.cuda.is_available())


# -----------------------------------------------------------------------------
# checkpoints: plain tensors and Python values only, written atomically, loaded with weights_only


def save_checkpoint(state, path):
    """Write to a temporary file, then rename: a crash mid-write leaves the previous file intact."""
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic on POSIX and Windows


def load_checkpoint(path, kind, make_it):
    """Load a checkpoint of the given kind ('autoencoder', 'prior', 'latents', ...), or fail in one
    line that says what is wrong and which command (`make_it`) writes a good one.
    weights_only=True: the file can hold tensors and plain values, never code to execute."""
    if not os.path.isfile(path):
        fail(f"{path} not found: run `{make_it}` first")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupted, or not a torch file at all
        fail(f"{path} is not a readable checkpoint ({type(e).__name__}): "
             f"rerun `{make_it}` to rewrite it")
    found = state.get("kind", "unknown") if isinstance(state, dict) else type(state).__name__
    if found != kind:
        fail(f"{path} holds a '{found}' checkpoint where a '{kind}' one is expected: run `{make_it}`")
    return state


def fingerprint(*tensors):
    """A short hash of the exact bytes of some tensors: two runs on the same latents agree."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def load_autoencoder(path, make_it, device="cpu"):
    """An autoencoder checkpoint -> (frozen Autoencoder in eval mode, its checkpoint dict). A
    stage-1 file holds the auxiliary decoder, whose width may differ: it is built to match."""
    state = load_checkpoint(path, "autoencoder", make_it)
    c = state["config"]
    dec_width = c["aux_width"] if state["stage"] == "1" else 1.0
    ae = Autoencoder(state["image_shape"][0], c["ch"], c["ch_mult"], c["num_res_blocks"],
                     c["z_channels"], dec_width=dec_width)
    ae.load_state_dict(state["model"])
    return ae.to(device).eval().requires_grad_(False), state


@torch.no_grad()
def encode_dataset(ae, dataset, device, num_workers=0):
    """Posterior mean and std of every image, plus labels, in dataset order (no shuffling, no
    flips), in float32 on every device: the prior and the latent scale are fitted to them."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=256, num_workers=num_workers)
    means, stds, labels = [], [], []
    for x, y, _ in loader:
        mean, std = ae.encode(x.to(device))
        means.append(mean.float().cpu())
        stds.append(std.float().cpu())
        labels.append(y)
    return torch.cat(means), torch.cat(stds), torch.cat(labels)


def load_prior(path, make_it, device="cpu", ema=True):
    """A prior checkpoint -> (DiT in eval mode with its EMA or its raw weights, its checkpoint)."""
    state = load_checkpoint(path, "prior", make_it)
    prior = DiT(**state["dit_config"])
    prior.load_state_dict(state["ema" if ema else "model"])
    return prior.to(device).eval().requires_grad_(False), state


# the data options a checkpoint records, and their defaults
DATA_DEFAULTS = {"data": "shapes", "data_dir": "data", "image_size": 32, "channels": 3,
                 "download": False, "data_seed": 0, "rotation": 1.0}


def add_data_options(parser):
    """The data options of train_ae.py; the checkpoints record them, so every later script reads
    the same data. Their defaults are None here and DATA_DEFAULTS once resolved."""
    parser.add_argument("--data", choices=["shapes", "mnist", "cifar10", "folder"],
                        help="* the dataset (default: shapes)")
    parser.add_argument("--data_dir", help="* where mnist/cifar10 files or the image folder are "
                                           "(default: data)")
    parser.add_argument("--download", action="store_true",
                        help="let torchvision download mnist/cifar10 (opt in)")
    parser.add_argument("--image_size", type=positive_int,
                        help="* images are resized to this square size (default: 32)")
    parser.add_argument("--channels", type=int, choices=[1, 3],
                        help="* channels for --data folder (default: 3)")
    parser.add_argument("--data_seed", type=int,
                        help="* which shapes are drawn, and the folder split (default: 0)")
    parser.add_argument("--rotation", type=unit_interval,
                        help="* shapes: the share of each symmetry period that rotations are "
                             "drawn from; 0 = upright, the control without rotation (default: 1)")


def dataset_of(config):
    """The dataset a config (a checkpoint's, or train_ae.py's arguments) describes."""
    options = {key: config.get(key, default) for key, default in DATA_DEFAULTS.items()}
    return get_dataset(options["data"], options["data_dir"], options["image_size"],
                       options["channels"], options["download"], options["data_seed"],
                       options["rotation"])
