"""
The plumbing the scripts share, none of it part of the method: errors and argument types, devices
and processes, the guard against non-finite steps, logs, the learning-rate schedule, pictures, and
two speed work-arounds. Read the scripts first; come here when one of them calls a helper whose
name is not enough.
"""
import argparse
import json
import math
import os
import shlex
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# errors a user can cause end in one line, never a traceback


def fail(message):
    """Stop the script with a one-line message that names the problem and the fix (exit code 1)."""
    raise SystemExit(f"error: {message}")


def command(*parts):
    """A command line that can be pasted into a shell as it is (paths with spaces get quoted)."""
    return "python " + shlex.join(str(p) for p in parts)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` shows every default once: not for options whose help already says it, nor None."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def checked(kind, ok, rule):
    """An argparse type for a `kind` number that satisfies `ok`; any other value ends in argparse's
    one-line error, e.g. "argument --batch_size: must be positive, got 0"."""

    def parse(text):
        value = kind(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value

    parse.__name__ = kind.__name__  # what argparse names when the text is no number at all
    return parse


positive_int = checked(int, lambda v: v > 0, "positive")
positive_float = checked(float, lambda v: v > 0, "positive")
non_negative = checked(float, lambda v: v >= 0, "0 or more")
probability = checked(float, lambda v: 0 <= v < 1, "in [0, 1)")
unit_interval = checked(float, lambda v: 0 <= v <= 1, "in [0, 1]")


def int_list(text):
    """An argparse type for comma-separated positive whole numbers: "1,2,4" -> [1, 2, 4]."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = [0]
    if min(values) <= 0:
        raise argparse.ArgumentTypeError(f"takes positive whole numbers such as 1,2,4, got '{text}'")
    return values


def add_run_options(parser, log_interval, ckpt_interval, fast_cpu_default=False):
    """The options both training scripts share: seed, device, compilation and precision, how often
    to log and save, resume. With fast_cpu_default, CPUs with bf16 matrix units default to both."""
    where = "cuda and CPUs with bf16 matrix units" if fast_cpu_default else "cuda"
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the model, the data order and every random draw")
    parser.add_argument("--device", default=default_device, help="cpu, cuda, cuda:1, mps")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction,
                        help=f"torch.compile (default: on for {where})")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"],
                        help=f"compute precision, through autocast "
                             f"(default: bfloat16 on {where}, float32 elsewhere)")
    parser.add_argument("--log_interval", type=positive_int, default=log_interval,
                        help="steps between log lines")
    parser.add_argument("--ckpt_interval", type=positive_int, default=ckpt_interval,
                        help="steps between checkpoints")
    parser.add_argument("--resume", action="store_true",
                        help="continue from this run's checkpoint in --out_dir")


def available_devices():
    """The devices this machine has, as --device spells them."""
    found = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        found.append("mps")
    return found


def check_device(name):
    """--device must name a device this machine has: fail in one line that lists the ones it has."""
    have = ", ".join(available_devices())
    try:
        device = torch.device(name)
    except RuntimeError:
        fail(f"--device {name} is not a device name: this machine has {have}")
    if device.type == "cuda":
        missing = not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()
    elif device.type == "mps":
        missing = not torch.backends.mps.is_available()
    else:
        missing = device.type != "cpu"
    if missing:
        fail(f"--device {name} is not available here: this machine has {have}")
    return name


def check_out_dir(out_dir, master_process=True):
    """The output directory must be a directory (made if missing), never an existing file."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        fail(f"--out_dir {out_dir} is a file: pass a directory")
    if master_process:
        os.makedirs(out_dir, exist_ok=True)


# -----------------------------------------------------------------------------
# processes: one per device, launched by torchrun (which sets RANK) or a plain single process


def setup_distributed(device):
    """Returns (rank, world_size, device). Under torchrun, joins the process group and picks this
    rank's GPU; otherwise rank 0 of 1 on the requested device."""
    check_device(device)
    if int(os.environ.get("RANK", -1)) == -1:
        return 0, 1, device
    if device.startswith("cuda"):
        processes, gpus = int(os.environ["LOCAL_WORLD_SIZE"]), torch.cuda.device_count()
        if processes > gpus:
            fail(f"torchrun started {processes} processes on this node, which has {gpus} GPU(s): "
                 f"use --nproc_per_node={gpus}")
    backend = "nccl" if device.startswith("cuda") else "gloo"  # gloo runs the same code on a cpu
    torch.distributed.init_process_group(backend=backend)
    rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    return rank, world_size, device


def precision(device, dtype=None, fast_cpu=False):
    """--dtype -> (dtype name, a function that returns a fresh autocast context for each `with`).
    bf16 autocast runs matmuls and convolutions in bfloat16 while weights and optimizer state stay
    float32, and unlike fp16 it needs no GradScaler. Default on GPUs, and on a cpu when `fast_cpu`.
    float32 is true float32: TF32 is turned off on GPUs, for convolutions too."""
    dtype = dtype or ("bfloat16" if device.startswith("cuda") or fast_cpu else "float32")
    torch.backends.cuda.matmul.allow_tf32 = False  # (cuDNN allows TF32 convolutions by default)
    torch.backends.cudnn.allow_tf32 = False
    device_type = "cuda" if device.startswith("cuda") else "cpu"

    def autocast():
        # a new object every time: one autocast object entered twice (nested) restores the wrong
        # state when it exits, and would leave autocast on for the rest of the process
        return torch.autocast(device_type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    return dtype, autocast


def wrap_model(model, compile_model, device, world_size, master_process, fast_cpu=False):
    """The module the training loop calls: compiled (by default on cuda, and on a cpu when
    `fast_cpu`) and, under torchrun, wrapped in DDP, which averages gradients across processes
    during backward. Checkpoints save the plain module."""
    if compile_model is None:
        compile_model = device.startswith("cuda") or fast_cpu
    if compile_model:
        if master_process:
            print("compiling the model... (takes a ~minute)")
        model = torch.compile(model)
    if world_size > 1:
        device_ids = [int(device.split(":")[1])] if device.startswith("cuda") else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    return model


class FiniteGuard:
    """Keeps a step whose loss or gradient is inf/NaN away from the weights, the EMA and every
    checkpoint, without a host-device sync per step. `check` runs on the device: a bad step's
    gradients become zero before the optimizer sees them, and its number is remembered. `verify`
    reads that number (one sync) at each log and before each checkpoint, and stops the run there,
    on every DDP process at once, so the last checkpoint written is the last good one."""

    def __init__(self, device, world_size, ckpt_path, lr):
        self.world_size, self.ckpt_path, self.lr = world_size, ckpt_path, lr
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)  # -1: none yet

    def check(self, loss, grad_norm, parameters, step):
        finite = torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)
        if self.world_size > 1:  # every process must agree, or the others would wait forever
            finite = finite.float()
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
            finite = finite.bool()
        for p in parameters:
            if p.grad is not None:
                p.grad.masked_fill_(~finite, 0.0)  # on a bad step every entry, NaN included
        first = (self.first_bad < 0) & ~finite
        self.first_bad = torch.where(first, step, self.first_bad)

    def verify(self):
        step = self.first_bad.item()
        if step < 0:
            return
        if step == 0:  # no update has happened yet: the learning rate cannot be the cause
            fix = "check the data, or try --dtype float32 or --no-compile"
        else:
            fix = f"lower --lr (now {self.lr}) and continue with --resume"
        fail(f"the loss or its gradient is not finite at step {step}, in at least one process; "
             f"the last good checkpoint is kept at {self.ckpt_path}: {fix}")


def checksum(raw_model):
    """Sum of every parameter in float64: equal on two DDP ranks only if their weights are."""
    return sum(p.detach().double().sum() for p in raw_model.parameters()).item()


def initial_checksum(raw_model, rank, world_size):
    """The same seed on every rank gives the same initial weights; print their sum to show it."""
    if world_size > 1:
        print(f"rank {rank}: initial checksum {checksum(raw_model)!r}", flush=True)


def finish_distributed(raw_model, rank, world_size, local_loss):
    """Under DDP every rank must end with the same weights: print a checksum (the tests compare
    them) and this rank's own loss, then leave together (gloo aborts a rank whose peer left)."""
    if world_size == 1:
        return
    print(f"rank {rank}: parameter checksum {checksum(raw_model)!r} | own loss {local_loss:.6f}",
          flush=True)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def average_gradients(parameters, world_size):
    """What DDP does during backward, done by hand for a module it does not wrap."""
    for p in parameters:
        torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.SUM)
        p.grad /= world_size


def stop_on_interrupt(step, guard, master_process, save, ckpt_path):
    """Ctrl-C: keep the finished steps (if every one was finite) with `save()`, print the command
    that continues the run (the one that was run, plus --resume), and exit with code 130."""
    guard.verify()
    if master_process:
        save()
        argv = sys.argv if "--resume" in sys.argv else sys.argv + ["--resume"]
        print(f"\ninterrupted: saved step {step} to {ckpt_path}; continue with: {command(*argv)}")
    raise SystemExit(130)


# -----------------------------------------------------------------------------
# logs: one printed line and one JSON line (out_dir/log.jsonl) per log interval

class TrainLog:
    """The training log: add() the loss parts of every step; every `interval` steps (and at the
    last) they are averaged over the steps and over all DDP processes, and rank 0 prints one line
    and appends one JSON object to out_dir/log.jsonl, so a run can be plotted later:
        rows = [json.loads(line) for line in open("out/log.jsonl")]
    Every row names its run ("ae stage 1", "prior", ...): one file holds a whole pipeline.
    With flops_per_item (on GPUs) the line ends in the model FLOPs utilisation, as nanoGPT's."""

    def __init__(self, out_dir, run, names, interval, max_iters, items_per_step, unit, world_size,
                 master_process, flops_per_item=None, peak_flops=None):
        self.path, self.run, self.names = os.path.join(out_dir, "log.jsonl"), run, names
        self.interval, self.max_iters = interval, max_iters
        self.items_per_step, self.unit = items_per_step, unit
        self.world_size, self.master_process = world_size, master_process
        self.flops_per_item, self.peak_flops = flops_per_item, peak_flops
        self.means = {name: math.nan for name in names}
        self.local_loss = math.nan
        self.sums, self.steps = None, 0
        self.start = self.t0 = time.time()

    def add(self, *parts):
        """This step's loss parts (tensors, in the order of `names`), summed on the device."""
        parts = torch.stack([p.detach().float() for p in parts])
        self.sums = parts if self.sums is None else self.sums + parts
        self.steps += 1

    def is_log_step(self, step):
        return step % self.interval == 0 or step == self.max_iters

    def after_step(self, step, lr, guard, save_now=False):
        """After optimizer step `step` (counted from 1), on every process: read the finiteness
        guard where a log line or a checkpoint needs it (one host-device sync; it stops the run if
        any step since was not finite), then log if this is a log step (a collective under DDP)."""
        if self.is_log_step(step) or save_now:
            guard.verify()
        if not self.is_log_step(step):
            return
        sums = self.sums / self.steps
        self.local_loss = sums[0].item()  # this rank's own share (the DDP tests compare it)
        if self.world_size > 1:  # the logged loss is the mean over every process
            torch.distributed.all_reduce(sums, op=torch.distributed.ReduceOp.SUM)
            sums /= self.world_size
        elapsed = time.time() - self.t0
        self.means = dict(zip(self.names, sums.tolist()))
        rate = self.steps * self.items_per_step / elapsed
        if self.master_process:
            self.print_line(step, lr, rate, elapsed)
        self.sums, self.steps, self.t0 = None, 0, time.time()

    def print_line(self, step, lr, rate, elapsed):
        loss = self.means[self.names[0]]
        parts = ", ".join(f"{name} {value:.4f}" for name, value in list(self.means.items())[1:])
        line = f"step {step}/{self.max_iters} | loss {loss:.4f}"
        if parts:
            line += f" ({parts})"
        seconds_left = (self.max_iters - step) * elapsed / self.steps
        line += f" | lr {lr:.1e} | {rate:.0f} {self.unit}/s | {seconds_left:.0f}s left"
        if self.flops_per_item:
            flops = rate * self.flops_per_item / self.world_size  # per GPU
            if self.peak_flops:
                line += f" | MFU {flops / self.peak_flops:.1%}"
            else:
                line += f" | {flops / 1e12:.1f} TFLOP/s per GPU"
        print(line)
        row = {"run": self.run, "step": step, **self.means, "lr": lr,
               f"{self.unit}_per_s": rate, "time": round(time.time() - self.start, 3)}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


# -----------------------------------------------------------------------------
# small shared helpers


def get_lr(step, lr, warmup_iters, max_iters, min_lr):
    """Linear warm-up to lr, then cosine decay to min_lr at max_iters (as in nanoGPT)."""
    if step < warmup_iters:
        return lr * (step + 1) / warmup_iters
    progress = min(1.0, (step - warmup_iters) / max(1, max_iters - warmup_iters))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def table_line(name, row, columns):
    """One aligned line of a printed table; columns are (key, heading, format); '-' where the row
    lacks a key or holds None, and the headings when row is None."""
    if row is None:
        return f"{name:18}" + "".join(f"{heading:>10}" for _, heading, _ in columns)
    cells = []
    for key, _, fmt in columns:
        value = row.get(key)
        cells.append("-" if value is None else format(value, fmt))
    return f"{name:18}" + "".join(f"{cell:>10}" for cell in cells)


def save_grid(images, path, nrow=8):
    """Save images in [-1, 1] of shape (N, C, H, W) as one PNG grid."""
    from torchvision.utils import save_image  # torchvision only when a picture is written
    save_image(images.float().clamp(-1, 1) * 0.5 + 0.5, path, nrow=nrow, padding=1)


# -----------------------------------------------------------------------------
# performance, not method: the very same functions, computed faster on some hardware. model.py's
# Attention and DiTBlock call these two; the speed section of assets/RESULTS.md measures them.


def attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v in one fused call (FlashAttention or memory-efficient kernels on
    GPUs). Under bf16 autocast on a cpu it runs in float32: PyTorch's bf16 attention backward is
    much slower there, and attention is a tiny share of the DiT's FLOPs at 16 tokens."""
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v)


class TanhGELU(nn.GELU):
    """DiT's GELU, nn.GELU(approximate="tanh"). Under torch.compile it is written as x * sigmoid(2u),
    the same function (0.5 (1 + tanh u) = sigmoid(2u)), for which inductor makes faster cpu code."""

    def __init__(self):
        super().__init__(approximate="tanh")

    def forward(self, x):
        if not torch.compiler.is_compiling():  # eager: PyTorch's own fused GELU is the fastest
            return super().forward(x)
        two_u = 2 * math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x)
        return x * torch.sigmoid(two_u)
