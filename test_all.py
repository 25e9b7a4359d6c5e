"""Tests in the order of the tutorial (data, autoencoder and DAE stages, DiT, diffusion, scores), then reliability
and the paths after the first run: `python -m pytest -q test_all.py` (cpu, offline). Scripts run as a user runs them."""
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

import data
import distance
import plumbing
from model import Attention, Autoencoder, Decoder, DiT, DiTBlock, GaussianDiffusion, PatchDiscriminator


# ---- helpers -----------------------------------------------------------------------------------------------------
HERE = os.path.dirname(os.path.abspath(__file__))
TINY_AE = ["--max_iters", "4", "--batch_size", "8", "--log_interval", "2", "--ckpt_interval", "2"]
TINY_PRIOR = ["--max_iters", "4", "--batch_size", "8", "--hidden_size", "32", "--depth", "1", "--num_heads", "2",
              "--log_interval", "2", "--ckpt_interval", "2", "--sample_interval", "0",
              "--dtype", "float32", "--no-compile"]  # not this CPU's bf16 + compile default: tests stay quick


def command(script, *args):
    """The command line that runs one of the project's scripts in a fresh process, as a user would."""
    return [sys.executable, os.path.join(HERE, script), *map(str, args)]


def run(script, *args, check=True):  # unless check is False, the script must succeed
    proc = subprocess.run(command(script, *args), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 or not check, f"{script} {args} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def assert_one_line_error(proc, *words):
    """A user error: non-zero exit, one line 'error: ...' naming the problem and the fix (after argparse's usage)."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and lines and "error:" in lines[-1], proc.stderr
    assert all(line.startswith(("usage:", " ")) for line in lines[:-1]), proc.stderr
    assert all(word in lines[-1] for word in words), (words, lines[-1])
    for quoted in lines[-1].split("`")[1::2]:  # a command it quotes can be pasted as it is
        for part in quoted.split(" && "):
            argv = shlex.split(part)
            assert argv[0] == "python" and os.path.isfile(os.path.join(HERE, argv[1])), quoted


def same(a, b):
    """Bit-for-bit equality of nested checkpoint contents."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(map(same, a, b))
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def load(out, name):  # a checkpoint file, read the safe way
    return torch.load(os.path.join(out, name), weights_only=True)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A tiny run of the whole pipeline (stage 1, stage 2, prior), shared by the tests that read it."""
    out = str(tmp_path_factory.mktemp("pipeline"))
    run("train_ae.py", "--stage", "1", "--out_dir", out, *TINY_AE, "--max_iters", "60", "--warmup_iters", "5")
    run("train_ae.py", "--stage", "2", "--out_dir", out, *TINY_AE)
    run("train_prior.py", "--out_dir", out, *TINY_PRIOR)
    return out


# ---- the data ----------------------------------------------------------------------------------------------------
def test_shapes_dataset_is_a_pure_function_of_seed_and_index():
    full, small = data.ShapesDataset("train"), data.ShapesDataset("train", size=50)
    assert len(full) == 20_000 and len(data.ShapesDataset("val")) == len(data.ShapesDataset("test")) == 2_000
    assert all(torch.equal(a, b) for i in (0, 7, 49) for a, b in zip(full[i], small[i]))
    others = [data.ShapesDataset(s, seed=seed, size=50) for s, seed in [("train", 1), ("val", 0), ("test", 0), ("val", 1)]]
    images = [small.images] + [other.images for other in others]  # val of seed 1 is no other seed's train or test
    assert all(not torch.equal(a, b) for i, a in enumerate(images) for b in images[i + 1:])  # five streams
    assert full[3][0].shape == (1, 32, 32) and full[3][2].shape == (6,) and set(full.labels.tolist()) == {0, 1, 2}
    assert full.images.min() >= -1 and full.images.max() <= 1
    # anti-aliased: edge pixels take values between the background and the shape's intensity
    assert ((full.images > -0.95) & (full.images < full.factors[:, 5].view(-1, 1, 1, 1) * 2 - 1.05)).any()
    base, square = torch.tensor([[0.0, 0.0, 0.4, 1.0, 0.0, 1.0]]), torch.tensor([1])  # centred; now move each factor
    for column, value in [(0, 0.2), (1, 0.2), (2, 0.5), (4, 1.0), (5, 0.5)]:  # x, y, scale, rotation, intensity
        moved = base.index_fill(1, torch.tensor([column]), value)
        assert not torch.allclose(data.render_shapes(square, base, 32), data.render_shapes(square, moved, 32)), column


def test_render_iou_sees_blur_dents_and_wrong_classes():
    images, labels, factors = data.load_split(data.ShapesDataset("val", size=600))
    real = data.render_iou(images, labels)  # real shapes against ideal ones of their class: nearly 1
    assert real.mean() > 0.97 and real.min() > 0.85
    blurred = F.avg_pool2d(F.pad(images, (2, 2, 2, 2), mode="replicate"), 5, stride=1)
    dented = images.clone()
    dented[:, :, 14:18, 12:20] = -1  # a hole across the middle
    for damaged, damaged_labels in [(blurred, labels), (dented, labels), (images, (labels + 1) % 3)]:
        assert data.render_iou(damaged, damaged_labels).mean() < real.mean() - 0.04
    as_asked = data.render_iou(data.render_shapes(torch.zeros_like(labels), factors, 32), labels)  # circles drawn
    assert as_asked[labels == 1].mean() < 0.9 and as_asked[labels == 2].mean() < 0.8  # where others were asked


def test_folder_dataset_and_bad_dataset_requests(tmp_path):
    from PIL import Image
    for i, (cls, size) in enumerate([("cats", (40, 50)), ("cats", (64, 64)), ("dogs", (20, 20)), ("dogs", (33, 17))] * 3):
        os.makedirs(tmp_path / cls, exist_ok=True)
        Image.new("RGB", size, (20 * i, 10, 10)).save(tmp_path / cls / f"{i}.png")  # image i: its own colour
    for channels in (1, 3):
        train, val, test, shape, num_classes = data.get_dataset("folder", str(tmp_path), 16, channels)
        assert shape == (channels, 16, 16) and num_classes == 2 and (len(train), len(val), len(test)) == (10, 1, 1)
        colours = {round(item[0].mean().item(), 4) for split in (train, val, test) for item in split}
        assert len(colours) == 12  # every image in exactly one split
        image, label, factors = train[0]
        assert image.shape == shape and factors.numel() == 0 and label in (0, 1) and image.abs().max() <= 1
    with pytest.raises(SystemExit, match="not a directory"):  # other dataset errors: see BAD_INPUT
        data.get_dataset("folder", str(tmp_path / "missing"))


def test_step_sampler_shards_and_resumes_and_lr_schedule():
    one = list(data.StepSampler(100, 16, seed=0, start_step=0, max_steps=20))
    r0, r1 = [list(data.StepSampler(100, 8, 0, 0, 20, rank=r, world_size=2)) for r in (0, 1)]
    assert all(a + b == c for a, b, c in zip(r0, r1, one))  # two ranks together = one process's batch
    assert all(not set(a) & set(b) for a, b in zip(r0, r1))  # and they never overlap
    assert list(data.StepSampler(100, 16, seed=0, start_step=7, max_steps=20)) == one[7:]  # resume
    assert len(set(sum(one[:6], []))) == 96  # an epoch (6 steps of 16) has no repeats
    lrs = [plumbing.get_lr(s, 1.0, 10, 100, 0.1) for s in range(101)]  # warm-up, then cosine down to min_lr
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and lrs[100] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


# ---- the autoencoder and the DAE's two stages --------------------------------------------------------------------
def test_autoencoder_shapes_weak_decoders_and_a_frozen_encoder():
    ae, x = Autoencoder(), torch.randn(2, 1, 32, 32)
    (mean, std), (recon, kl) = ae.encode(x), ae(x)
    assert mean.shape == std.shape == (2, 4, 8, 8) and (std > 0).all() and recon.shape == x.shape and kl >= 0
    assert Autoencoder(3, ch=8, ch_mult=(1, 2, 2, 2), z_channels=8).encode(torch.randn(1, 3, 64, 64))[0].shape == (1, 8, 8, 8)
    params = [sum(p.numel() for p in Decoder(width=w).parameters()) for w in (0.125, 0.25, 0.5, 1.0)]
    assert params == sorted(set(params)) and params[3] > 8 * params[1]  # every width a distinct, smaller class
    dropped, z = Decoder(dropout=0.5).train(), torch.randn(2, 4, 8, 8)
    assert not torch.equal(dropped(z), dropped(z)) and torch.equal(dropped.eval()(z), dropped(z))  # train vs eval
    ae, x = Autoencoder(dropout=0.5).freeze_encoder(), torch.randn(4, 1, 32, 32)
    ae.train()  # what the training loop calls: must not wake the encoder up
    assert not ae.encoder.training and ae.decoder.training
    before, mean_before = {k: v.clone() for k, v in ae.encoder.state_dict().items()}, ae.encode(x)[0]
    opt = torch.optim.AdamW([p for p in ae.parameters() if p.requires_grad], lr=1e-2)
    (ae(x)[0] - x).abs().mean().backward()
    opt.step()
    assert all(p.grad is None for p in ae.encoder.parameters()) and same(before, ae.encoder.state_dict())
    assert torch.equal(mean_before, ae.encode(x)[0])  # deterministic: encoder dropout is off


def test_discriminator_learns_from_its_hinge_loss_only():
    torch.manual_seed(0)
    ae, disc, x = Autoencoder(), PatchDiscriminator(1, 16), torch.randn(4, 1, 32, 32)
    (alone := PatchDiscriminator(1, 16)).load_state_dict(disc.state_dict())
    recon = ae(x)[0]
    ((recon - x).abs().mean() + 0.5 * disc.generator_loss(recon)).backward()  # the autoencoder's step...
    assert all(p.grad is None for p in disc.parameters()) and ae.decoder.layers[0].weight.grad is not None
    steps = [torch.optim.AdamW(d.parameters(), lr=1e-2) for d in (disc, alone)]
    disc.hinge_loss(x, recon).backward()  # ...then the discriminator's, as train_ae.py does them
    alone.hinge_loss(x, recon.detach()).backward()
    for optimizer in steps:  # the same update as from the hinge loss alone
        optimizer.step()
    assert same(disc.state_dict(), alone.state_dict())
    assert not same(disc.state_dict(), PatchDiscriminator(1, 16).state_dict())  # and it did learn


def test_two_stage_dae_end_to_end(pipeline):
    stage1, final, latents = load(pipeline, "ae_stage1.pt"), load(pipeline, "ae.pt"), load(pipeline, "latents.pt")
    assert stage1["stage"] == "1" and stage1["step"] == 60 and final["stage"] == "2" and final["step"] == 4
    assert all(os.path.isfile(os.path.join(pipeline, n)) for n in ("recon_stage1.png", "recon.png", "prior_samples.png"))
    encoder_keys = [k for k in final["model"] if k.startswith(("encoder.", "quant_conv."))]  # stage 1's, bit for bit
    assert encoder_keys and all(torch.equal(stage1["model"][k], final["model"][k]) for k in encoder_keys)
    assert not torch.equal(stage1["model"]["decoder.layers.0.weight"], final["model"]["decoder.layers.0.weight"])
    assert latents["mean"].shape == (20_000, 4, 8, 8) and torch.equal(latents["labels"], data.ShapesDataset().labels)
    z = (latents["mean"] + latents["std"] * torch.randn_like(latents["std"])) * latents["latent_scale"]
    assert z.std().item() == pytest.approx(1.0, rel=0.05)  # the whole training set, in order, scaled to unit variance
    assert final["latent_scale"] == latents["latent_scale"] and math.isfinite(final["val_psnr"])
    rows = [json.loads(line) for line in open(os.path.join(pipeline, "log.jsonl"))]  # one line per log interval
    assert [(r["run"], r["step"]) for r in rows] == [("ae stage 1", s) for s in range(2, 61, 2)] + [
        ("ae stage 2", 2), ("ae stage 2", 4), ("prior", 2), ("prior", 4)]
    assert all(math.isfinite(r["loss"]) and r["lr"] > 0 and r["time"] >= 0 for r in rows)


def test_joint_baseline_runs_downstream_and_nan_loss_stops(tmp_path):
    run("train_ae.py", "--stage", "joint", "--out_dir", out := tmp_path, *TINY_AE, "--dtype", "bfloat16",  # cpu autocast
        "--gan_weight", "0.1")  # and VQGAN's adversarial loss
    assert load(out, "ae.pt")["stage"] == "joint" and {"latent_scale", "discriminator"} <= load(out, "ae.pt").keys()
    run("train_prior.py", "--out_dir", out, *TINY_PRIOR, "--compile", "--dtype", "bfloat16")  # the GPU paths, on cpu
    assert not any("_orig_mod" in k for k in load(out, "prior.pt")["model"])  # saved: the plain module, loadable
    run("sample.py", "--out_dir", out, "--num_samples", "2", "--steps", "2")
    blow_up = ["--lr", "1e30", "--warmup_iters", "1", "--grad_clip", "0", "--max_iters", "20", "--ckpt_interval", "1"]
    proc = run("train_ae.py", "--stage", "1", "--out_dir", out, "--batch_size", "8", *blow_up, check=False)  # a NaN loss stops it
    assert_one_line_error(proc, "not finite", "--lr")
    assert 1 <= load(out, "ae_stage1.pt")["step"] < 20  # (the prior's check: the DDP test below)


# ---- the DiT prior -----------------------------------------------------------------------------------------------
def small_dit(randomise=False, **kw):
    """A tiny DiT. adaLN-Zero makes a fresh one output exactly 0: `randomise` gives the zeroed layers weights."""
    torch.manual_seed(1)  # the same weights in every process
    dit = DiT(**{**dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=3,
                        learn_sigma=False), **kw})
    for p in dit.parameters():
        if randomise and p.requires_grad and not p.any():
            p.data.normal_(std=0.05)
    return dit


def test_dit_state_dict_matches_the_original_layout_and_patchify_round_trips():
    dit, D = small_dit(learn_sigma=True), 64
    block = {"attn.qkv": (3 * D, D), "attn.proj": (D, D), "mlp.fc1": (4 * D, D), "mlp.fc2": (D, 4 * D),
             "adaLN_modulation.1": (6 * D, D)}
    expected = {"x_embedder.proj.weight": (D, 4, 2, 2), "t_embedder.mlp.0.weight": (D, 256), "t_embedder.mlp.2.weight": (D, D),
                "final_layer.linear.weight": (2 * 2 * 8, D), "final_layer.adaLN_modulation.1.weight": (2 * D, D),
                **{f"blocks.{n}.{name}.weight": shape for n in range(2) for name, shape in block.items()}}
    expected |= {k.replace("weight", "bias"): shape[:1] for k, shape in expected.items()}
    expected |= {"pos_embed": (1, 16, D), "y_embedder.embedding_table.weight": (3 + 1, D)}  # + the "no class" row
    assert {k: tuple(v.shape) for k, v in dit.state_dict().items()} == expected  # the original's: nothing more or less
    assert dit(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 1])).shape == (2, 8, 8, 8)
    pe = dit.pos_embed[0]  # fixed: the first half of the features encodes the column, the second half the row
    assert torch.allclose(pe[1, :D // 4], torch.sin(torch.ones(D // 4) / 10000 ** (torch.arange(D // 4) / (D / 4))))
    assert torch.equal(pe[0, D // 2:], pe[1, D // 2:]) and not torch.equal(pe[0, D // 2:], pe[4, D // 2:])
    with pytest.raises(ValueError, match="square"):
        DiT(input_size=(8, 4), patch_size=2)
    dit, x = small_dit(), torch.randn(3, 4, 8, 8)
    assert torch.equal(dit.unpatchify(rearrange(x, "n c (h p) (w q) -> n (h w) (p q c)", p=2, q=2)), x)
    moved = x.clone()  # the patch embedding reads the same patch as token k: move one patch, one token moves
    moved[:, :, 2:4, 4:6] += 1.0  # the patch in row 1, column 2 of the 4x4 grid: token 1 * 4 + 2 = 6
    changed = (dit.x_embedder(moved) - dit.x_embedder(x)).abs().sum(-1)[0]
    assert changed.nonzero().flatten().tolist() == [6]


def test_adaln_zero_starts_at_zero_and_the_dit_depends_on_t_and_y_and_compiles_to_the_same_function():
    block, x = DiTBlock(64, 4), torch.randn(2, 16, 64)
    [torch.nn.init.zeros_(p) for p in block.adaLN_modulation[-1].parameters()]  # adaLN-Zero
    assert torch.equal(block(x, torch.randn(2, 64)), x)
    assert torch.equal(small_dit()(torch.randn(2, 4, 8, 8), torch.tensor([3, 5]), torch.tensor([0, 1])), torch.zeros(2, 4, 8, 8))
    dit, x, t, y = small_dit(True).eval(), torch.randn(2, 4, 8, 8), torch.tensor([10, 10]), torch.tensor([0, 0])
    out = dit(x, t, y)
    assert torch.allclose(torch.compile(dit)(x, t, y), out, atol=1e-5)  # compiled, GELU takes its sigmoid form
    assert not torch.allclose(out, dit(x, t + 490, y)) and not torch.allclose(out, dit(x, t, y + 1))
    assert torch.equal(out, dit(x, t, y))  # eval: no label dropout
    dit.y_embedder.dropout_prob = 1.0  # training with certain dropout: every label becomes "no class"
    assert torch.equal(dit.train()(x, t, torch.tensor([0, 1])), dit(x, t, torch.tensor([3, 3])))


def test_fused_attention_equals_written_out_softmax():
    attn, x = Attention(64, 4), torch.randn(2, 16, 64)
    q, k, v = rearrange(attn.qkv(x), "n t (three h d) -> three n h t d", three=3, h=4)
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(16), dim=-1)
    assert torch.allclose(attn(x), reference := attn.proj(rearrange(weights @ v, "n h t d -> n t (h d)")), atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 on a cpu: the attention itself runs in float32
        assert attn(x).dtype == torch.bfloat16 and torch.allclose(attn(x).float(), reference, atol=0.05)


# ---- diffusion ---------------------------------------------------------------------------------------------------
def test_schedule_is_float32_and_q_sample_matches_the_formula_and_ddim_timesteps():
    diffusion = GaussianDiffusion()
    assert diffusion.betas.dtype == diffusion.alphas_cumprod.dtype == torch.float32
    assert diffusion.betas[0].item() == pytest.approx(1e-4) and diffusion.betas[-1].item() == pytest.approx(0.02)
    x0, noise, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([0, 500, 999])
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[t].float().view(-1, 1, 1, 1)
    assert torch.allclose(diffusion.q_sample(x0, t, noise), abar.sqrt() * x0 + (1 - abar).sqrt() * noise, atol=1e-6)
    for steps in (2, 50, 999, 1000):  # DDIM's sub-sequence: `steps` entries, decreasing, from T-1 to 0
        times = diffusion.ddim_timesteps(steps)
        assert len(times) == steps and times[0] == 999 and times[-1] == 0 and all(a > b for a, b in zip(times, times[1:]))
    assert diffusion.ddim_timesteps(1) == [999]  # one step: from pure noise straight to x0
    with pytest.raises(ValueError):
        diffusion.ddim_timesteps(0)


def test_cfg_scale_one_is_conditional_and_larger_scales_guide_every_channel():
    diffusion, dit = GaussianDiffusion(), small_dit(True).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([300, 300]), torch.tensor([0, 2])
    cond, uncond = dit(x, t, y), dit(x, t, torch.tensor([3, 3]))
    assert torch.equal(diffusion.guided_eps(dit, x, t, y, 1.0, null_label=3), cond)
    guided = diffusion.guided_eps(dit, x, t, y, 4.0, null_label=3)
    assert torch.allclose(guided, uncond + 4.0 * (cond - uncond), atol=1e-5)
    assert all(not torch.allclose(guided[:, c], cond[:, c]) for c in range(4))  # all four channels guided
    runs = [diffusion.ddim_sample(dit, x, y, 4, cfg_scale=4.0, null_label=3, guide_below=b) for b in (0, 500, 1000)]
    assert torch.equal(runs[0], diffusion.ddim_sample(dit, x, y, 4)) and not runs[1].equal(runs[0]) and not runs[1].equal(runs[2])


@pytest.mark.parametrize("steps,eta", [("ddpm", 1.0), (1000, 0.0), (50, 1.0), (50, 0.0)])
def test_samplers_reach_a_known_gaussian(steps, eta):
    diffusion, mean, std, g = GaussianDiffusion(), 0.7, 0.5, torch.Generator().manual_seed(0)
    def model(x, t, y):  # for data ~ N(mean, std^2) the optimal noise predictor is known in closed form:
        abar = diffusion.alphas_cumprod[t].view(-1, 1)  # x_t ~ N(sqrt(abar) mean, abar std^2 + 1 - abar), and
        return (1 - abar).sqrt() * (x - abar.sqrt() * mean) / (abar * std ** 2 + 1 - abar)  # E[noise | x_t] is this
    noise, y = torch.randn(20_000, 1, generator=g), torch.zeros(20_000, dtype=torch.long)
    x = diffusion.ddpm_sample(model, noise, y, generator=g) if steps == "ddpm" else \
        diffusion.ddim_sample(model, noise, y, steps, eta, generator=g)
    assert x.mean().item() == pytest.approx(mean, abs=0.02)
    if steps in ("ddpm", 1000):
        assert x.std().item() == pytest.approx(std, rel=0.03)
    else:  # 50 coarse steps plug in the predicted x0 where its posterior spread belongs, and lose a
        assert 0.85 * std < x.std().item() < std  # little variance: within 15 %, never above the target


# ---- the distance and the scores ---------------------------------------------------------------------------------
def test_capacity_curve_ranks_a_latent_with_less_information_worse_and_trains_probes_to_convergence():
    images = data.load_split(data.ShapesDataset("train", size=2048))[0]
    latents = {"8x8 means": lambda x: F.avg_pool2d(x, 4).repeat(1, 4, 1, 1),  # the image, block-averaged
               "2x2 means": lambda x: F.interpolate(F.avg_pool2d(x, 16), scale_factor=4).repeat(1, 4, 1, 1),
               "noise": lambda x: torch.randn(x.shape[0], 4, 8, 8)}  # nothing about the image at all
    curve = lambda latent, **options: distance.capacity_curve(latent, images[:1792], images[1792:], **options)[0]
    l1 = {name: curve(latent, widths=(0.25,), steps=200)["l1"] for name, latent in latents.items()}
    bf16 = curve(latents["8x8 means"], widths=(0.25,), steps=200, dtype="bfloat16")["l1"]  # autocast: close, not equal
    assert l1["8x8 means"] < l1["2x2 means"] < l1["noise"] and 0 < abs(bf16 / l1["8x8 means"] - 1) < 0.1, (l1, bf16)
    row = curve(latents["8x8 means"], widths=(0.25,), steps=600, patience=1, check_every=100)  # to convergence:
    assert 200 < row["kept_step"] <= row["steps"] <= 600 and row["l1"] < l1["8x8 means"], row  # on while it gains
    row = curve(latents["8x8 means"], widths=(0.125,), steps=10_000, lr=1e-12, patience=1, check_every=20)
    assert (row["kept_step"], row["steps"]) == (20, 80), row  # a rate too small to move: the 3 lr drops end it


def test_frechet_distance_and_precision_recall_on_known_answers():
    fd, g = distance.frechet_distance, torch.Generator().manual_seed(0)
    a, b = torch.randn(20_000, 4, generator=g), 2 * torch.randn(20_000, 4, generator=g) + 1
    assert fd(a, a) == pytest.approx(0, abs=1e-9) and fd(a, b) == pytest.approx(fd(b, a), rel=1e-9)
    assert fd(a, b) == pytest.approx(8.0, rel=0.05)  # N(0, I) vs N(1, 4I) in 4-d: |1|^2 * 4 + tr(I + 4I - 2 * 2I)
    for bad, words in ((torch.full((5, 4), math.nan), "NaN"), (a[:1], "at least 2")):
        with pytest.raises(SystemExit, match=words):
            fd(bad, a)
    g, centres = torch.Generator().manual_seed(0), torch.tensor([[0.0, 0, 0, 0], [10, 0, 0, 0], [0, 10, 0, 0]])
    labels = torch.arange(3000) % 3  # three well-separated classes
    real, fake = [centres[labels] + torch.randn(3000, 4, generator=g) for _ in range(2)]
    assert distance.precision_recall(real, real) == (1.0, 1.0)
    assert min(distance.precision_recall(real, fake)) > 0.9  # another draw of the same distribution
    precision, recall = distance.precision_recall(real, fake[labels != 0])  # a class missing:
    assert precision > 0.9 and recall < 0.7  # every sample realistic, a third of the data not covered
    assert distance.precision_recall(real, 3 * fake)[0] < 0.2  # samples off the data: fidelity falls


def test_evaluator_on_a_small_folder_stops_early_ranks_damage_alike_and_scores_unpaired_and_is_cached(tmp_path, capsys):
    from PIL import Image
    own = tmp_path / "own"  # 900 images of one's own in 3 class folders, read at 16x16: 720 train, 90 val, 90 test
    for i, (image, label, _) in enumerate(data.ShapesDataset("train", size=900)):
        os.makedirs(own / str(label.item()), exist_ok=True)
        Image.fromarray(((image[0] + 1) * 127.5).round().byte().numpy()).save(own / str(label.item()) / f"{i}.png")
    train, val, (x, labels, _) = [data.load_split(s) for s in data.get_dataset("folder", str(own), 16, 1)[:3]]
    fit = lambda val, steps=200, seed=0: distance.train_evaluator(train, val, (1, 16, 16), 3, steps=steps, seed=seed)
    (net, info), early = fit(val), fit((val[0], (val[1] + 1) % 3, val[2]))[1]["kept_step"]  # with val labels that
    assert info["augment"] and info["accuracy"] > 0.5 and early < 100 < info["kept_step"]  # training only gets wrong
    damaged = {"as is": x, "blurred": F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1),
               "more blurred": F.avg_pool2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), 5, stride=1),
               "noisy": (x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1),
               "no circles": x[labels != 0]}
    for seed, first in ((0, net), (1, None)):  # two evaluators, two seeds, one order: the floor (test vs val) lowest
        net = fit(val, seed=seed)[0]
        fd = {k: distance.frechet_distance(*[distance.features(net, d) for d in (d, val[0])]) for k, d in damaged.items()}
        assert fd["as is"] < fd["blurred"] < fd["more blurred"] and fd["as is"] < min(fd["noisy"], fd["no circles"])
        assert first is None or torch.equal(distance.features(first, x), distance.features(net, x))  # same seed, same
    perfect = SimpleNamespace(encode=lambda x: (x, None), decode=lambda z: z)  # reconstructs every image exactly
    config = {"data": "folder", "data_dir": str(own), "image_size": 16, "channels": 1, "download": False}
    m = distance.score_samples(x, None, perfect, {"config": config, "num_classes": 3, "stage": "2"},
                               {"mean": train[0][:300], "std": torch.zeros(300, 1, 16, 16)}, str(tmp_path), eval_steps=200)
    assert m["fd"] == m["fd_recon"] == m["fd_real"] > 0  # test images against val: never against themselves
    config, _ = {"data": "shapes", "data_dir": "data", "data_seed": 0, "image_size": 32, "channels": 3}, capsys.readouterr()
    for data_config in (config, config, {**config, "data_seed": 1}):
        distance.get_evaluator(str(tmp_path), *[data.ShapesDataset(s, size=300) for s in ("train", "val")], (1, 32, 32),
                               3, data_config, steps=5)
    printed = capsys.readouterr().out  # the cache: kept for the same data, retrained for other data
    assert printed.count("training the evaluator") == printed.count("retraining") == 2  # folder -> shapes, seed 0 -> 1


def test_sample_grid_npz_eval_and_distance_scripts(pipeline, tmp_path):
    out = str(shutil.copytree(pipeline, tmp_path / "out"))
    a, b, npz = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "s.npz"
    fast = ["--out_dir", out, "--num_samples", "6", "--steps", "3"]
    run("sample.py", *fast, "--output", a, "--save_npz", npz)
    run("sample.py", *fast, "--output", b, "--seed", "1")
    assert open(a, "rb").read() != open(b, "rb").read()  # another seed, other samples
    run("sample.py", *fast, "--output", b)
    assert open(a, "rb").read() == open(b, "rb").read()  # the same seed, the same samples
    elsewhere = tmp_path / "elsewhere"  # explicit checkpoints: nothing to copy; progress for many batches
    proc = run("sample.py", "--out_dir", elsewhere, "--ae", f"{out}/ae.pt", "--prior", f"{out}/prior.pt",
               "--num_samples", "6", "--batch_size", "2", "--steps", "3")
    assert open(a, "rb").read() == open(elsewhere / "samples.png", "rb").read() and "sampling: 6/6" in proc.stdout
    pixels = np.load(npz)["arr_0"]  # the FID/IS suites' layout: uint8 (N, H, W, C)
    assert pixels.shape == (6, 32, 32, 1) and pixels.dtype == np.uint8 and pixels.max() > pixels.min()
    run("sample.py", "--out_dir", out, "--eval", "--num_samples", "64", "--steps", "2", "--eval_steps", "30")
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    dit = metrics["scores"]["DiT samples"]  # its FD is the mean term plus a covariance term that is >= 0
    assert metrics["num_samples"] == 64 == dit["count"] and 0 <= dit["fd_mean_term"] <= dit["fd"] + 1e-6
    assert 0 <= metrics["fd_real"] < metrics["fd"] and metrics["fd_recon"] > 0 and metrics["fd_gaussian"] > 0
    assert metrics["split"] == "val" and 0 <= metrics["class_match"] <= 1 and metrics["num_reference"] == 2000
    assert metrics["scores"]["real (test)"]["render_iou"] > dit["render_iou"]  # real shapes beat a 4-step prior's
    assert metrics["sampler"]["cfg_scale"] == 3.0 and metrics["sampler"]["guide_below"] == 500 and abs(sum(metrics["class_shares"]) - 1) < 1e-6  # guided by default
    proc = run("distance.py", "--out_dir", out, "--steps", 5, "--patience", 1, "--num_train", 256, "--eval_steps", 30,
               "--dtype", "bfloat16")
    assert "training the evaluator" not in proc.stdout  # the cached evaluator of --eval is reused
    rows = json.load(open(os.path.join(out, "distance.json")))["rows"]
    assert [(r["width"], r["dropout"]) for r in rows] == [(0.125, 0), (0.25, 0), (0.5, 0), (1, 0), (1, 0.2)]  # + stage 1's
    params = [r["params"] for r in rows]  # every width a distinct class; stage 1's class has the full width's params
    assert params[0] < params[1] < params[2] < params[3] == params[4] and {(r["kept_step"], r["dtype"]) for r in rows} == {(5, "bfloat16")}
    assert all(r["l1"] > 0 and r["fd"] >= 0 and 0 <= r["render_iou"] <= 1 for r in rows) and rows[3]["l1"] != rows[4]["l1"]


# ---- bad input: one line, a non-zero exit, and every file in out_dir byte-for-byte unchanged ---------------------
def edit(out, name, **changes):  # change some entries of a checkpoint in out_dir
    torch.save({**load(out, name), **changes}, os.path.join(out, name))


# one representative per kind of failure: (how to break out_dir, script, arguments, words the error line must hold)
BAD_INPUT = {
    "stage2_without_stage1": (lambda o: os.remove(f"{o}/ae_stage1.pt"), "train_ae.py", ["--stage", "2"], ["--stage 1"]),
    "truncated_checkpoint": (lambda o: open(f"{o}/ae.pt", "r+b").truncate(5000), "sample.py", [], ["readable"]),
    "code_in_checkpoint": (lambda o: torch.save({"kind": "prior", "x": torch.nn.ReLU()}, f"{o}/prior.pt"), "sample.py", [], ["readable"]),
    "prior_as_autoencoder": (lambda o: shutil.copy(f"{o}/prior.pt", f"{o}/ae.pt"), "sample.py", [], ["'prior'"]),
    "latents_missing": (lambda o: os.remove(f"{o}/latents.pt"), "train_prior.py", [], ["train_ae.py --stage 2"]),
    "latent_shape_mismatch": (lambda o: edit(o, "prior.pt", latent_shape=[8, 8, 8]), "sample.py", [], ["train_prior.py"]),
    "architecture_mismatch": (None, "train_ae.py", ["--stage", "2", "--ch", "8"], ["--ch"]),
    "cfg_on_unconditional": (lambda o: edit(o, "prior.pt", num_classes=0), "sample.py", ["--cfg_scale", "3"], ["uncondit"]),
    "batch_size_0": (None, "train_ae.py", ["--stage", "1", "--batch_size", "0"], ["--batch_size"]),
    "image_size": (None, "train_ae.py", ["--stage", "1", "--image_size", "30"], ["divisible"]),
    "dataset_files_missing": (None, "train_ae.py", ["--stage", "1", "--data", "mnist", "--data_dir", "OUT"], ["--download"]),
    "out_dir_is_a_file": (None, "train_prior.py", ["--out_dir", "FILE"], ["is a file"]),
    "no_cuda_here": (None, "sample.py", ["--device", "cuda:7"], ["this machine has", "cpu"]),
    "misspelt_device": (None, "train_ae.py", ["--stage", "1", "--device", "gpu"], ["not a device", "cpu"]),
    "npz_dir_missing": (None, "sample.py", ["--save_npz", "OUT/missing/s.npz"], ["does not exist"]),
    "eta_above_1": (None, "sample.py", ["--eta", "1.5"], ["--eta", "[0, 1]"]),
    "misspelt_probe_class": (None, "distance.py", ["--widths", "0.5,wide"], ["--widths", "aux"]),
    "joint_over_dae": (None, "train_ae.py", ["--stage", "joint"], ["--overwrite"]),
    "resume_on_other_latents": (lambda o: edit(o, "latents.pt", fingerprint="0" * 16), "train_prior.py",
                                ["--resume", *TINY_PRIOR], ["other latents"]),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input(case, pipeline, tmp_path):
    out = str(shutil.copytree(pipeline, tmp_path / "out"))
    breaks, script, args, words = BAD_INPUT[case]
    if breaks:
        breaks(out)
    files = {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)}
    args = [{"FILE": os.path.join(out, "recon.png")}.get(a, a.replace("OUT", out)) for a in args]
    assert_one_line_error(run(script, "--out_dir", out, *args, check=False), *words)
    assert files == {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)}


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    plumbing.save_checkpoint({"kind": "x", "v": torch.ones(3)}, path := str(tmp_path / "c.pt"))

    def killed_mid_write(obj, f):  # half a file written, then the process is interrupted
        with open(f, "wb") as half:
            half.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        plumbing.save_checkpoint({"kind": "x", "v": torch.zeros(3)}, path)
    assert torch.equal(plumbing.load_checkpoint(path, "x", "")["v"], torch.ones(3))


# ---- reliability and scale: non-finite steps, seeds, exact resume, Ctrl-C, DDP -----------------------------------
def test_a_step_stops_before_a_non_finite_update_and_draws_from_its_own_seed():
    finite, nan, inf = torch.tensor(0.5), torch.tensor(math.nan), torch.tensor(math.inf)
    plumbing.check_step_is_finite(finite, torch.tensor(3.0), 1, 7, "prior.pt", 1e-3)  # fine: carries on
    for step, loss, grad_norm, fix in [(7, finite, nan, "--lr"), (7, finite, inf, "--lr"), (0, nan, finite, "--no-compile")]:
        with pytest.raises(SystemExit, match=f"not finite at step {step},.*: .*{fix}"):  # a finite loss is not enough
            plumbing.check_step_is_finite(loss, grad_norm, 1, step, "prior.pt", 1e-3)
    seeds = {plumbing.step_seed(0, rank, step) for rank in range(8) for step in range(0, 100_000, 9)}
    assert len(seeds) == 8 * len(range(0, 100_000, 9))  # no (rank, step) shares another one's random draws
    assert all(plumbing.step_seed(0, 1, s) != plumbing.step_seed(0, 0, s + 7919) for s in range(50))
    assert plumbing.step_seed(3, 1, 5) == plumbing.step_seed(3, 1, 5) != plumbing.step_seed(4, 1, 5)


RESUME = {  # case: (script, files it needs from the pipeline, arguments, its checkpoint)
    "ae_stage2": ("train_ae.py", ["ae_stage1.pt"], ["--stage", "2"], "ae.pt"),
    "prior": ("train_prior.py", ["ae.pt", "latents.pt"], TINY_PRIOR[2:], "prior.pt"),
    "prior_bf16": ("train_prior.py", ["ae.pt", "latents.pt"], [*TINY_PRIOR[2:], "--dtype", "bfloat16"], "prior.pt"),
}


@pytest.mark.parametrize("case", RESUME)
def test_resume_after_sigkill_is_exact(case, pipeline, tmp_path):
    script, needs, args, ckpt = RESUME[case]
    args = [*args, "--max_iters", "24", "--batch_size", "16", "--ckpt_interval", "4", "--log_interval", "4"]
    dirs = [str(tmp_path / name) for name in ("once", "again", "killed")]
    for out in dirs:  # each starts from only the files the script needs
        shutil.copytree(pipeline, out, ignore=lambda folder, names: [n for n in names if n not in needs])
    run(script, "--out_dir", dirs[0], *args)
    proc = subprocess.Popen(command(script, "--out_dir", dirs[2], *args), stdout=subprocess.DEVNULL)
    while not os.path.exists(os.path.join(dirs[2], ckpt)):
        assert proc.poll() is None, "finished before the first checkpoint"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)  # a real kill: no clean-up code runs
    assert proc.wait() == -signal.SIGKILL and 4 <= (killed_at := load(dirs[2], ckpt)["step"]) < 24
    resumed = run(script, "--out_dir", dirs[2], *args, "--resume")
    assert f"steps {killed_at} -> 24" in resumed.stdout
    once, continued = load(dirs[0], ckpt), load(dirs[2], ckpt)  # weights, EMA, moments, step, loss: bit-identical
    assert continued["step"] == 24 and same({**once, "config": 0}, {**continued, "config": 0})  # (config: --resume)
    if case == "prior":  # determinism: the same seed and settings, twice in a row, give bit-identical checkpoints
        run(script, "--out_dir", dirs[1], *args)
        assert same({**once, "config": 0}, {**load(dirs[1], ckpt), "config": 0})


def test_ctrl_c_saves_and_says_how_to_resume(pipeline, tmp_path):
    shutil.copy(os.path.join(pipeline, "latents.pt"), tmp_path)
    proc = subprocess.Popen(command("train_prior.py", "--out_dir", tmp_path, *TINY_PRIOR[2:], "--max_iters", "100000"),
                            stdout=subprocess.PIPE, text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    while not os.path.exists(os.path.join(tmp_path, "prior.pt")):
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)  # Ctrl-C (reset to default above: a background CI shell may ignore it)
    stdout, step = proc.communicate(timeout=60)[0], load(tmp_path, "prior.pt")["step"]
    assert proc.returncode == 130 and step >= 2 and f"saved step {step} " in stdout and "--resume" in stdout


@pytest.mark.parametrize("script", ["train_ae.py", "train_prior.py"])
def test_torchrun_two_processes(script, pipeline, tmp_path):
    args = ["--stage", "1", *TINY_AE, "--gan_weight", "0.1"] if script == "train_ae.py" else TINY_PRIOR
    shutil.copy(os.path.join(pipeline, "latents.pt"), tmp_path)  # what train_prior.py reads
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.join(HERE, script), "--out_dir", tmp_path, *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    number = r"(-?[0-9][0-9.e+-]*)"  # two processes share the pipe: read numbers, not whatever follows them
    start = re.findall(r"initial checksum " + number, proc.stdout)
    end = re.findall(rf"parameter checksum {number} \| own loss {number}", proc.stdout)
    assert len(start) == 2 and start[0] == start[1]  # both ranks start from the same weights,
    assert len(end) == 2 and end[0][0] == end[1][0] != start[0]  # and end identical after training
    assert "global batch 16" in proc.stdout and proc.stdout.count("step 4/4") == 1  # rank 0 alone logs
    own = [float(loss) for _, loss in end]  # different shards, different losses; the log shows their mean
    logged = float(re.search(r"step 4/4 \| loss (\S+)", proc.stdout).group(1))
    assert own[0] != own[1] and logged == pytest.approx(sum(own) / 2, abs=1e-4)
    written = {"ae_stage1.pt", "recon_stage1.png"} if script == "train_ae.py" else {"prior.pt"}
    assert set(os.listdir(tmp_path)) == {"latents.pt", "log.jsonl"} | written  # no stray files from a second writer


def ddp_gradient_worker(rank, init_file, batch, result_file):
    """One of 2 processes: DDP's mean gradient of the two halves of a batch."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    model = torch.nn.parallel.DistributedDataParallel(small_dit(True, class_dropout_prob=0.0))
    x, t, y, target = [part.chunk(2)[rank] for part in batch]
    F.mse_loss(model(x, t, y), target).backward()
    if rank == 0:
        torch.save([p.grad for p in model.module.parameters()], result_file)
    torch.distributed.barrier()  # leave together, and skip gloo's C++ teardown, which CI saw abort (SIGABRT)
    os._exit(0)


def test_ddp_gradient_equals_one_process_on_the_union(tmp_path):
    g = torch.Generator().manual_seed(0)  # the random draws of the step, fixed up front
    batch = [torch.randn(8, 4, 8, 8, generator=g), torch.randint(0, 1000, (8,), generator=g),
             torch.randint(0, 3, (8,), generator=g), torch.randn(8, 4, 8, 8, generator=g)]
    torch.multiprocessing.spawn(ddp_gradient_worker, (str(tmp_path / "init"), batch, str(tmp_path / "g.pt")), nprocs=2)
    model = small_dit(True, class_dropout_prob=0.0)
    F.mse_loss(model(*batch[:3]), batch[3]).backward()
    ddp_grads = torch.load(tmp_path / "g.pt", weights_only=True)  # below: pos_embed is fixed, so it has no gradient
    pairs = [(p.grad, q) for p, q in zip(model.parameters(), ddp_grads) if p.requires_grad]
    assert len(pairs) > 20 and all(torch.allclose(p, q, atol=1e-6, rtol=1e-4) for p, q in pairs)


def test_nan_on_one_rank_stops_every_rank_and_keeps_the_last_good_checkpoint(pipeline, tmp_path):
    latents = load(pipeline, "latents.pt")
    rank1_step2 = next(iter(data.StepSampler(len(latents["labels"]), 8, 0, 2, 3, rank=1, world_size=2)))
    latents["mean"][rank1_step2[0]] = math.nan  # one bad latent, in rank 1's share of step 2 only
    torch.save(latents, tmp_path / "latents.pt")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.join(HERE, "train_prior.py"), "--out_dir", tmp_path, *TINY_PRIOR],
                          capture_output=True, text=True, timeout=240)  # a rank left waiting would hang here
    assert proc.returncode != 0 and proc.stderr.count("not finite at step 2, in at least one process") == 2
    prior = load(tmp_path, "prior.pt")
    assert prior["step"] == 2 and all(torch.isfinite(v).all() for v in [*prior["model"].values(), *prior["ema"].values()])


# ---- after the first run: your own images, a prior without label dropout -----------------------------------------
def test_flat_image_folder_is_one_class_and_stage_2_takes_stage_1s_options(tmp_path):
    from PIL import Image
    os.makedirs(pictures := tmp_path / "pictures")  # a user's own images: no class sub-folders
    for i in range(12):
        Image.new("RGB", (20 + i, 24), (20 * i, 100, 30)).save(pictures / f"{i}.png")
    train, val, test, shape, num_classes = data.get_dataset("folder", str(pictures), 16, 1)
    assert num_classes == 1 and len(train) + len(val) + len(test) == 12 and {item[1].item() for item in train} == {0}
    out, own = tmp_path / "out", ["--data", "folder", "--data_dir", pictures, "--image_size", "16", "--channels", "1",
                                  "--ch", "8", "--ch_mult", "1,2", "--aux_dropout", "0.3"]
    assert "one unlabelled class" in run("train_ae.py", "--stage", "1", "--out_dir", out, *own, *TINY_AE).stdout
    stage2 = run("train_ae.py", "--stage", "2", "--out_dir", out, *TINY_AE).stdout  # the options are not repeated
    assert "--data folder" in stage2 and "--ch_mult 1,2 " in stage2 and "--aux_dropout 0.3" in stage2  # stage 1's
    assert load(out, "ae.pt")["config"]["ch"] == 8 and load(out, "ae.pt")["config"]["aux_dropout"] == 0.3
    assert "unconditional" in run("train_prior.py", "--out_dir", out, *TINY_PRIOR, "--class_dropout_prob", "0").stdout
    assert load(out, "prior.pt")["num_classes"] == 0
    run("sample.py", "--out_dir", out, "--num_samples", "2", "--steps", "2")


def test_prior_without_label_dropout_samples_unguided(pipeline, tmp_path):
    out = str(shutil.copytree(pipeline, tmp_path / "out"))
    run("train_prior.py", "--out_dir", out, *TINY_PRIOR, "--class_dropout_prob", "0")
    assert "without guidance" in run("sample.py", "--out_dir", out, "--num_samples", "2", "--steps", "2").stdout
    assert_one_line_error(run("sample.py", "--out_dir", out, "--cfg_scale", "3", check=False), "--cfg_scale")
