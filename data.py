"""
The data: the datasets, whole splits as tensors (for the evaluator), and the step-indexed batch
sampler that shards batches across DDP ranks.

Datasets (every item is `(image, label, factors)`, image a float tensor in [-1, 1] of shape (C, H, W)):
  shapes   built in, no files: anti-aliased circles, squares and triangles with known generative
           factors (position x/y, scale, rotation, intensity), so evaluation can compare against them
  mnist    torchvision MNIST from files you already have in --data_dir (or opt in with --download)
  cifar10  torchvision CIFAR-10, the same way
  folder   any directory of images: one sub-folder per class (torchvision ImageFolder), or the
           images themselves with no sub-folders (one unlabelled class)
"""
import math
import os

import torch
import torch.nn.functional as F

from plumbing import fail

# -----------------------------------------------------------------------------
# the built-in dataset: procedural shapes

SHAPE_NAMES = ["circle", "square", "triangle"]
# rotation only means something up to the shape's symmetry, so it is drawn as a fraction of
# that period and stored as (cos, sin) to keep the factor vector continuous
SYMMETRY = torch.tensor([1.0, 4.0, 3.0])  # circle: any angle; square: 90 degrees; triangle: 120
FACTOR_NAMES = ["x", "y", "scale", "rot_cos", "rot_sin", "intensity"]


class ShapesDataset(torch.utils.data.Dataset):
    """One grey shape on black, drawn from a signed distance function with 1-pixel anti-aliasing.

    Item i is a pure function of (seed, split, i): its factors come from a generator seeded with
    those three numbers, so the 5th image is the same whether the set holds 100 or 20,000 images.
    Splits: train (20,000), val (2,000: every choice of default is made on it), test (2,000: reports only).
    The whole split is rendered once at construction (a few hundred milliseconds), in batches.
    """

    def __init__(self, split="train", image_size=32, seed=0, size=None):
        split_id = {"train": 0, "test": 1, "val": 2}[split]
        size = size or (20_000 if split == "train" else 2_000)
        # six uniform numbers per item, each row from its own generator: item i never depends on the others
        u = torch.stack([torch.rand(6, generator=torch.Generator().manual_seed((seed * 3 + split_id) * 10_000_019 + i))
                         for i in range(size)])
        angle = 2 * math.pi * u[:, 4]  # a fraction of one symmetry period, as an angle on the circle
        self.labels = (u[:, 0] * len(SHAPE_NAMES)).long()
        self.factors = torch.stack([0.8 * u[:, 1] - 0.4, 0.8 * u[:, 2] - 0.4, 0.3 + 0.3 * u[:, 3],
                                    angle.cos(), angle.sin(), 0.4 + 0.6 * u[:, 5]], dim=1)
        self.images = torch.cat([render_shapes(self.labels[s:s + 4096], self.factors[s:s + 4096], image_size)
                                 for s in range(0, size, 4096)])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i], self.factors[i]


def render_shapes(labels, factors, image_size):
    """Rasterise a batch of shapes: labels (N,), factors (N, 6) -> images (N, 1, S, S) in [-1, 1]."""
    x, y, scale, rot_cos, rot_sin, intensity = [f.view(-1, 1, 1) for f in factors.T]
    axis = (torch.arange(image_size) + 0.5) / image_size * 2 - 1  # pixel centres in [-1, 1]
    py, px = axis.view(1, -1, 1) - y, axis.view(1, 1, -1) - x  # (N, S, S) each
    # the angle on the unit circle is one full turn per symmetry period: divide it back down
    angle = torch.atan2(rot_sin, rot_cos) / SYMMETRY[labels].view(-1, 1, 1)
    qx = px * angle.cos() + py * angle.sin()  # pixel in the shape's own rotated frame
    qy = -px * angle.sin() + py * angle.cos()
    circle = (px ** 2 + py ** 2).sqrt() - scale
    square = torch.maximum(qx.abs(), qy.abs()) - 0.8 * scale  # same area as the circle, roughly
    # an equilateral triangle is the intersection of three half-planes at 120 degrees
    normals = [(math.cos(a), math.sin(a)) for a in (math.pi / 2, math.pi / 2 + 2.094395, math.pi / 2 + 4.18879)]
    triangle = torch.stack([qx * nx + qy * ny for nx, ny in normals]).amax(0) - 0.6 * scale
    dist = torch.where(labels.view(-1, 1, 1) == 0, circle, torch.where(labels.view(-1, 1, 1) == 1, square, triangle))
    # coverage: 1 inside, 0 outside, a linear ramp one pixel wide across the edge (anti-aliasing)
    coverage = (0.5 - dist * image_size / 2).clamp(0, 1)
    return (intensity * coverage * 2 - 1).unsqueeze(1)


# the area of each shape at scale 1, in the [-1, 1] square: circle pi r^2, square (1.6)^2, triangle 3 sqrt(3) 0.6^2
SHAPE_AREA = torch.tensor([math.pi, 1.6 ** 2, 3 * math.sqrt(3) * 0.6 ** 2])


def render_iou(images, labels, angles=36):
    """How much each image looks like the ideal shape of class `labels` (the class asked for, or the true
    one): the image is cut at half its brightness into a mask; the ideal shape gets the mask's centre,
    area and brightness and the best of `angles` rotations of its symmetry period, and is cut the same
    way; the score is the intersection over union of the two masks (1: the same pixels). A dented,
    blurred or wrong-class image scores lower. images (N, 1, S, S) in [-1, 1], labels (N,) -> (N,)."""
    size = images.shape[-1]
    intensity = (images.flatten(1).amax(1) + 1) / 2  # the shape's inside is fully covered: its brightness
    drawn = images > (intensity - 1).view(-1, 1, 1, 1)  # cut at half the brightness, on the [-1, 1] scale
    axis = (torch.arange(size) + 0.5) / size * 2 - 1
    count = drawn.flatten(1).sum(1).clamp_min(1)
    x = (drawn * axis.view(1, 1, 1, -1)).flatten(1).sum(1) / count  # the mask's centre
    y = (drawn * axis.view(1, 1, -1, 1)).flatten(1).sum(1) / count
    scale = (count * (2 / size) ** 2 / SHAPE_AREA[labels]).sqrt()  # the scale whose shape has this area
    best = torch.zeros(len(images))
    for angle in torch.arange(angles) * 2 * math.pi / angles:
        factors = torch.stack([x, y, scale, angle.cos().expand_as(x), angle.sin().expand_as(x), intensity], 1)
        ideal = render_shapes(labels, factors, size) > (intensity - 1).view(-1, 1, 1, 1)
        iou = (drawn & ideal).flatten(1).sum(1) / (drawn | ideal).flatten(1).sum(1).clamp_min(1)
        best = torch.maximum(best, iou)
    return best


# -----------------------------------------------------------------------------
# torchvision datasets, imported lazily so the built-in path never needs torchvision's data code


class WithFactors(torch.utils.data.Dataset):
    """Gives a torchvision dataset the (image, label, factors) items of the built-in one (no factors)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        image, label = self.dataset[i]
        return image, torch.tensor(label), torch.zeros(0)


class FlatImageFolder(torch.utils.data.Dataset):
    """The images of one directory, no sub-folders: the usual layout of a user's own pictures. They
    are one unlabelled class (label 0), so the prior trained on them is unconditional."""

    def __init__(self, root, transform):
        from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader
        self.paths = sorted(os.path.join(root, f) for f in os.listdir(root) if f.lower().endswith(IMG_EXTENSIONS))
        self.transform, self.loader, self.classes = transform, default_loader, ["images"]

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.transform(self.loader(self.paths[i])), 0


def image_folder(data_dir, transform):
    """--data folder: one sub-folder per class if there are any (torchvision's ImageFolder), else the
    images in data_dir itself as one class. Returns (dataset, the layout found, in words)."""
    import torchvision
    if not os.path.isdir(data_dir):
        fail(f"--data_dir {data_dir} is not a directory: point it at a folder of images (or of class sub-folders)")
    try:
        full = torchvision.datasets.ImageFolder(data_dir, transform=transform)
        return full, f"{len(full.classes)} classes, one per sub-folder"
    except (FileNotFoundError, RuntimeError):  # no sub-folder holds an image: look at the folder itself
        flat = FlatImageFolder(data_dir, transform)
        if not flat.paths:
            fail(f"no images found in {data_dir} or its sub-folders: add .png/.jpg files, "
                 f"in one sub-folder per class or all in the folder itself")
        return flat, "no class sub-folders: one unlabelled class (the prior will be unconditional)"


def get_dataset(name, data_dir="data", image_size=32, channels=3, download=False, seed=0):
    """Returns (train, val, test sets, image shape (C, H, W), number of classes). Models train on train;
    every choice (a default, the evaluator's early stop) is made on val; test only reports final figures."""
    if name == "shapes":
        return (*[ShapesDataset(split, image_size, seed) for split in ("train", "val", "test")],
                (1, image_size, image_size), len(SHAPE_NAMES))
    if name not in ("mnist", "cifar10", "folder"):
        fail(f"unknown dataset '{name}': choose one of shapes, mnist, cifar10, folder")
    import torchvision
    from torchvision import transforms as T
    if name != "folder":
        channels = 1 if name == "mnist" else 3
    to_tensor = T.Compose([T.Resize(image_size), T.CenterCrop(image_size),
                           T.Grayscale(channels) if channels == 1 else T.Lambda(lambda im: im.convert("RGB")),
                           T.ToTensor(), T.Normalize([0.5] * channels, [0.5] * channels)])
    shape = (channels, image_size, image_size)
    if name == "folder":
        full, layout = image_folder(data_dir, to_tensor)
        if len(full) < 3:
            fail(f"{data_dir} holds {len(full)} image(s): the folder dataset needs at least 3 (train, val, test)")
        if int(os.environ.get("RANK", 0)) == 0:  # said once, not by every DDP process
            print(f"--data folder {data_dir}: {len(full)} images, {layout}")
        # a fixed 10 % of the images (at least one) is the test split, another 10 % validation
        test, train = carve(full, len(full) // 10, seed)
        val, train = carve(train, len(full) // 10, seed)
        return WithFactors(train), WithFactors(val), WithFactors(test), shape, len(full.classes)
    cls = {"mnist": torchvision.datasets.MNIST, "cifar10": torchvision.datasets.CIFAR10}[name]
    try:
        train, test = [cls(data_dir, train=t, transform=to_tensor, download=download) for t in (True, False)]
    except RuntimeError:
        fail(f"{name} files not found in --data_dir {data_dir}: copy them there or add --download")
    val, train = carve(train, len(train) // 10, seed)  # the official test set stays the test split
    return WithFactors(train), WithFactors(val), WithFactors(test), shape, 10


def carve(dataset, count, seed):
    """(a fixed random slice of `count` items, at least one, the rest): the same items on every run."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    count = max(1, count)
    return torch.utils.data.Subset(dataset, order[:count]), torch.utils.data.Subset(dataset, order[count:])


# -----------------------------------------------------------------------------
# whole splits as tensors, and the one augmentation (distance.train_evaluator uses both)


def load_split(dataset, max_count=None):
    """The first max_count items of a dataset as three tensors: images, labels, factors."""
    count = len(dataset) if max_count is None else min(max_count, len(dataset))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(count)), batch_size=500)
    images, labels, factors = zip(*loader)
    return torch.cat(images), torch.cat(labels), torch.cat(factors)


def shift_images(images, max_shift, generator):
    """Shift each image by its own random whole number of pixels in [-max_shift, max_shift] along each axis,
    repeating the border pixels into the gap: the augmentation that keeps a class a class."""
    n, size = len(images), images.shape[-1]
    pixels = torch.randint(-max_shift, max_shift + 1, (n, 2), generator=generator).float()
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, :, 2] = -2 * pixels / size  # grid coordinates span 2 over `size` pixels
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="nearest", padding_mode="border", align_corners=False)


# -----------------------------------------------------------------------------
# batches indexed by step: the same step always gets the same examples, whatever the process count


class StepSampler:
    """A batch sampler for DataLoader that yields the examples of steps start_step .. max_steps - 1.

    The global batch of step s is a slice of a permutation drawn from (seed, epoch), and rank r of
    W processes takes the r-th contiguous piece of it. So the data order needs no state in the
    checkpoint (resume just starts at the saved step), and two processes with batch B together see
    exactly the 2B examples one process with batch 2B would see.
    """

    def __init__(self, num_examples, batch_size, seed, start_step, max_steps, rank=0, world_size=1):
        self.global_batch = batch_size * world_size
        if self.global_batch > num_examples:
            fail(f"global batch {self.global_batch} is larger than the dataset ({num_examples}): lower --batch_size")
        self.n, self.batch_size, self.seed, self.rank = num_examples, batch_size, seed, rank
        self.steps = range(start_step, max_steps)
        self.steps_per_epoch = num_examples // self.global_batch  # drop the ragged end of every epoch

    def __len__(self):
        return len(self.steps)

    def __iter__(self):
        epoch, order = None, None
        for step in self.steps:
            if step // self.steps_per_epoch != epoch:  # a new epoch: a new permutation of the data
                epoch = step // self.steps_per_epoch
                order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
            start = (step % self.steps_per_epoch) * self.global_batch + self.rank * self.batch_size
            yield order[start:start + self.batch_size].tolist()


def make_loader(dataset, batch_size, seed, start_step, max_steps, rank=0, world_size=1, num_workers=0):
    """A DataLoader over the batches of steps start_step .. max_steps - 1 for this rank."""
    sampler = StepSampler(len(dataset), batch_size, seed, start_step, max_steps, rank, world_size)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                       pin_memory=torch.cuda.is_available())
