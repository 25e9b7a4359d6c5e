"""
The plumbing the scripts share, none of it part of the method: errors, devices and processes, random
streams, checkpoints, logs, the learning-rate schedule and pictures. Read the scripts first; come here
when one of them calls a helper whose name is not enough.
"""
import argparse
import contextlib
import hashlib
import json
import math
import os
import shlex
import shutil
import sys
import time

import numpy as np
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
    """`--help` with every default shown once: not for options whose help already says it, nor None."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def add_run_options(parser, log_interval, ckpt_interval, fast_cpu_default=False):
    """The options both training scripts share: seed, device, compilation and precision, how often to log
    and save, resume. With fast_cpu_default (the prior), CPUs with bf16 matrix units default to both."""
    where = "cuda and CPUs with bf16 matrix units" if fast_cpu_default else "cuda"
    parser.add_argument("--seed", type=int, default=0, help="seeds the model, the data order and every random draw")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1, mps")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, help=f"torch.compile (default: on for {where})")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"],
                        help=f"compute precision, through autocast (default: bfloat16 on {where}, float32 elsewhere)")
    parser.add_argument("--log_interval", type=int, default=log_interval, help="steps between log lines")
    parser.add_argument("--ckpt_interval", type=int, default=ckpt_interval, help="steps between checkpoints")
    parser.add_argument("--resume", action="store_true", help="continue from this run's checkpoint in --out_dir")


def available_devices():
    """The devices this machine has, as --device spells them."""
    found = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return found + (["mps"] if torch.backends.mps.is_available() else [])


def check_device(name):
    """--device must name a device this machine has: fail in one line that lists the ones it does."""
    have = ", ".join(available_devices())
    try:
        device = torch.device(name)
    except RuntimeError:
        fail(f"--device {name} is not a device name: this machine has {have}")
    index = device.index or 0
    missing = {"cuda": not torch.cuda.is_available() or index >= torch.cuda.device_count(),
               "mps": not torch.backends.mps.is_available(), "cpu": False}.get(device.type, True)
    if missing:
        fail(f"--device {name} is not available here: this machine has {have}")
    return name


def check_output_file(path, option):
    """Before any work: a file this run will write must go into an existing directory and not be one."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        fail(f"{option} {path}: the directory {folder} does not exist; create it or pick another path")
    if os.path.isdir(path):
        fail(f"{option} {path} is a directory: give a file name")


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
    backend = "nccl" if device.startswith("cuda") else "gloo"  # gloo runs the same code on cpu
    torch.distributed.init_process_group(backend=backend)
    rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    return rank, world_size, device


def fast_bf16_cpu():
    """Does this CPU have bf16 matrix units (Intel AMX, or AVX512-BF16) and a C++ compiler for
    torch.compile? There the DiT trains about twice as fast in bf16 autocast, compiled (README,
    "Performance notes"), so train_prior.py turns both on by default, as on a GPU."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:  # not Linux: no way to tell, so float32
        return False
    return (" amx_bf16" in flags or " avx512_bf16" in flags) and shutil.which("c++") is not None


def precision(device, dtype=None, fast_cpu=False):
    """--dtype -> (dtype name, autocast context to wrap forward passes in). bf16 autocast runs matmuls
    and convolutions in bfloat16 while weights and optimizer state stay float32, and unlike fp16 it
    needs no GradScaler. Default on GPUs, and on a cpu when `fast_cpu`; else float32."""
    dtype = dtype or ("bfloat16" if device.startswith("cuda") or fast_cpu else "float32")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # float32 on Ampere+: TF32
    if dtype == "float32":
        return dtype, contextlib.nullcontext()
    return dtype, torch.autocast("cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16)


def wrap_model(model, compile_model, device, world_size, master_process, fast_cpu=False):
    """The module the training loop calls: compiled (by default on cuda, and on a cpu when `fast_cpu`)
    and, under torchrun, wrapped in DDP, which averages gradients across processes during backward.
    Checkpoints save the plain module."""
    if compile_model if compile_model is not None else (device.startswith("cuda") or fast_cpu):
        if master_process:
            print("compiling the model... (takes a ~minute)")
        model = torch.compile(model)
    if world_size > 1:
        device_ids = [int(device.split(":")[1])] if device.startswith("cuda") else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    return model


def step_seed(seed, rank, step):
    """The seed of every random draw of one step on one process (noise, t, dropout). Hashing the three
    numbers together keeps the streams apart: no (rank, step) ever reuses another one's draws, and a
    resumed run re-creates them from the step alone."""
    words = np.random.SeedSequence([seed, rank, step]).generate_state(2, dtype=np.uint32)
    return int(words[0]) << 32 | int(words[1])


def check_step_is_finite(loss, grad_norm, world_size, step, ckpt_path, lr):
    """Before the optimizer step: a loss or a gradient that is inf/NaN must never reach the weights (or
    the EMA, or a checkpoint). Under DDP every process must agree to stop, or the others would wait for
    it forever, so the verdict is reduced over all of them (MIN of 1 = fine, 0 = not)."""
    finite = (torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)).float().reshape(1)
    if world_size > 1:
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    if finite.item() == 0:  # at step 0 no update has happened: the learning rate cannot be the cause
        fix = (f"lower --lr (now {lr}) and continue with --resume" if step else
               "check the data, or try --dtype float32 or --no-compile (see the README's Performance notes)")
        fail(f"the loss ({loss.item():.4g}) or its gradient (norm {grad_norm.item():.4g}) is not finite at step "
             f"{step}, in at least one process; the last good checkpoint is kept at {ckpt_path}: {fix}")


def checksum(raw_model):
    """Sum of every parameter in float64: equal on two DDP ranks only if their weights are equal."""
    return sum(p.detach().double().sum() for p in raw_model.parameters()).item()


def initial_checksum(raw_model, rank, world_size):
    """The same seed on every rank gives the same initial weights; print their sum to show it."""
    if world_size > 1:
        print(f"rank {rank}: initial checksum {checksum(raw_model)!r}", flush=True)


def average_gradients(module, world_size):
    """For a module that DDP does not wrap (the GAN discriminator): the mean gradient over processes."""
    if world_size > 1:
        for p in module.parameters():
            torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.SUM)
            p.grad /= world_size


def finish_distributed(raw_model, rank, world_size, local_loss):
    """Under DDP every rank must end with the same weights: print a checksum (the tests compare them)
    and this rank's own loss, then leave together (gloo aborts a rank whose peer has hung up)."""
    if world_size == 1:
        return
    print(f"rank {rank}: parameter checksum {checksum(raw_model)!r} | own loss {local_loss:.6f}", flush=True)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def resume_command():
    """The command that was run, plus --resume: what Ctrl-C tells the user to run next."""
    argv = sys.argv + ([] if "--resume" in sys.argv else ["--resume"])
    return command(*argv)


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
    weights_only=True means the file can hold tensors and plain values but never code to execute."""
    if not os.path.isfile(path):
        fail(f"{path} not found: run `{make_it}` first")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupted, or not a torch file at all
        fail(f"{path} is not a readable checkpoint ({type(e).__name__}): rerun `{make_it}` to rewrite it")
    if not isinstance(state, dict) or state.get("kind") != kind:
        found = state.get("kind", "unknown") if isinstance(state, dict) else type(state).__name__
        fail(f"{path} holds a '{found}' checkpoint where a '{kind}' one is expected: run `{make_it}`")
    return state


def fingerprint(*tensors):
    """A short hash of the exact bytes of some tensors: two runs on the same latents agree, others not."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


# -----------------------------------------------------------------------------
# logs: one printed line and one JSON line (out_dir/log.jsonl) per log interval


class TrainLog:
    """The training log: add() the loss parts of every step; every `interval` steps (and at the last)
    they are averaged over the steps and over all DDP processes, and rank 0 prints one line and appends
    one JSON object to out_dir/log.jsonl, so a run can be plotted later:
        rows = [json.loads(line) for line in open("out/log.jsonl")]
    Every row names its run ("ae stage 1", "prior", ...): one file holds a whole pipeline."""

    def __init__(self, out_dir, run, names, interval, max_iters, items_per_step, unit, world_size, master_process,
                 flops_per_item=None):
        self.path, self.run, self.names, self.flops_per_item = os.path.join(out_dir, "log.jsonl"), run, names, flops_per_item
        self.interval, self.max_iters, self.items_per_step, self.unit = interval, max_iters, items_per_step, unit
        self.world_size, self.master_process, self.start = world_size, master_process, time.time()
        self.means, self.local_loss = {name: math.nan for name in names}, math.nan
        self.sums, self.steps, self.t0 = None, 0, time.time()

    def add(self, *parts):
        """This step's loss parts (tensors, in the order of `names`), summed on the device: no sync."""
        parts = torch.stack([p.detach().float() for p in parts])
        self.sums = parts if self.sums is None else self.sums + parts
        self.steps += 1

    def after_step(self, step, lr):
        """After optimizer step `step` (counted from 1): log if this is a log step. Every process must call it.
        With flops_per_item (on GPUs) the line ends in the model FLOPs utilisation, as nanoGPT's does."""
        if step % self.interval and step != self.max_iters:
            return
        sums = self.sums / self.steps
        self.local_loss = sums[0].item()  # this rank's own share (the DDP tests compare it across ranks)
        if self.world_size > 1:  # the logged loss is the mean over every process (SUM: every backend has it)
            torch.distributed.all_reduce(sums, op=torch.distributed.ReduceOp.SUM)
            sums /= self.world_size
        elapsed = time.time() - self.t0
        self.means, rate = dict(zip(self.names, sums.tolist())), self.steps * self.items_per_step / elapsed
        extra = "" if not self.flops_per_item else \
            f" | MFU {rate * self.flops_per_item / (312e12 * self.world_size) * 100:.1f}% (of A100 bf16)"
        if self.master_process:
            parts = ", ".join(f"{name} {value:.4f}" for name, value in list(self.means.items())[1:])
            print(f"step {step}/{self.max_iters} | loss {self.means[self.names[0]]:.4f}" + (f" ({parts})" if parts else "")
                  + f" | lr {lr:.1e} | {rate:.0f} {self.unit}/s | "
                  f"{(self.max_iters - step) * elapsed / self.steps:.0f}s left{extra}")
            with open(self.path, "a") as f:
                f.write(json.dumps({"run": self.run, "step": step, **self.means, "lr": lr,
                                    f"{self.unit}_per_s": rate, "time": round(time.time() - self.start, 3)}) + "\n")
        self.sums, self.steps, self.t0 = None, 0, time.time()


class Progress:
    """Progress of a long loop of `total` items: about ten lines with the rate and the time left, so a
    50,000-sample run does not sit silent. Quiet when everything fits in one batch."""

    def __init__(self, what, total, batch_size):
        self.what, self.total, self.start = what, total, time.time()
        self.every = max(1, math.ceil(total / batch_size / 10))  # batches between lines
        self.quiet, self.batches = total <= batch_size, 0

    def update(self, done):
        self.batches += 1
        if self.quiet or (self.batches % self.every and done < self.total):
            return
        elapsed = time.time() - self.start
        rate = done / max(elapsed, 1e-9)
        print(f"{self.what}: {done}/{self.total} ({done / self.total:.0%}) | {rate:.1f}/s | "
              f"{(self.total - done) / rate:.0f}s left", flush=True)


# -----------------------------------------------------------------------------
# small shared helpers


def get_lr(step, lr, warmup_iters, max_iters, min_lr):
    """Linear warm-up to lr, then cosine decay to min_lr at max_iters (as in nanoGPT)."""
    if step < warmup_iters:
        return lr * (step + 1) / warmup_iters
    progress = min(1.0, (step - warmup_iters) / max(1, max_iters - warmup_iters))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def table_line(name, row, columns):
    """One aligned line of a printed table; columns are (key, heading, format); '-' where row lacks a key,
    and the headings when row is None."""
    if row is None:
        return f"{name:18}" + "".join(f"{heading:>10}" for _, heading, _ in columns)
    return f"{name:18}" + "".join(f"{format(row[k], fmt) if k in row else '-':>10}" for k, _, fmt in columns)


def save_grid(images, path, nrow=8):
    """Save images in [-1, 1] of shape (N, C, H, W) as one PNG grid."""
    from torchvision.utils import save_image  # torchvision only when a picture is written
    save_image(images.float().clamp(-1, 1) * 0.5 + 0.5, path, nrow=nrow, padding=1)


# -----------------------------------------------------------------------------
# performance, not method: the very same functions, computed faster on some hardware. model.py's
# Attention and DiTBlock call these two; README.md ("Performance notes") has the measurements behind them.


def attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v in one fused call (FlashAttention / memory-efficient kernels on GPUs).
    Under bf16 autocast on a cpu it runs in float32: PyTorch's bf16 attention backward is much slower
    there, and attention is a tiny share of the DiT's FLOPs at 16 tokens."""
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v)


class TanhGELU(nn.GELU):
    """DiT's GELU, nn.GELU(approximate="tanh"). Under torch.compile it is written as x * sigmoid(2u),
    the same function (0.5 (1 + tanh u) = sigmoid(2u)), for which inductor makes faster cpu code."""

    def __init__(self):
        super().__init__(approximate="tanh")

    def forward(self, x):
        if not torch.compiler.is_compiling():  # eager: PyTorch's own fused GELU kernel is the fastest
            return super().forward(x)
        return x * torch.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))  # 2u, u = sqrt(2/pi) (x + ...)


# -----------------------------------------------------------------------------
# the models, rebuilt from their checkpoints (one place, used by every script)


def load_autoencoder(path, make_it, device="cpu"):
    """An autoencoder checkpoint -> (frozen Autoencoder in eval mode, its checkpoint dict). A stage-1
    file holds the auxiliary decoder, whose width may differ: that one is built to load it exactly."""
    from model import Autoencoder
    state = load_checkpoint(path, "autoencoder", make_it)
    c = state["config"]
    ae = Autoencoder(state["image_shape"][0], c["ch"], c["ch_mult"], c["num_res_blocks"], c["z_channels"],
                     dec_width=c["aux_width"] if state["stage"] == "1" else 1.0)
    ae.load_state_dict(state["model"])
    return ae.to(device).eval().requires_grad_(False), state


def load_prior(path, make_it, device="cpu", ema=True):
    """A prior checkpoint -> (DiT in eval mode with its EMA weights, or the raw ones, its checkpoint dict)."""
    from model import DiT
    state = load_checkpoint(path, "prior", make_it)
    prior = DiT(**state["dit_config"])
    prior.load_state_dict(state["ema" if ema else "model"])
    return prior.to(device).eval().requires_grad_(False), state
