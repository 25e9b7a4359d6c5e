"""Tests in the tutorial's order (data, the DAE's stages, DiT, diffusion, training, scores), then bad input,
reliability and the paths after the first run: `python -m pytest -q test_all.py`, offline, on a cpu."""
import json
import math
import os
import pickle
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

import data
import distance
import evaluate
import plumbing
from model import Attention, Autoencoder, Decoder, DiT, DiTBlock, GaussianDiffusion

HERE = os.path.dirname(os.path.abspath(__file__))
TINY_AE = ["--max_iters", "4", "--batch_size", "8", "--log_interval", "2", "--ckpt_interval", "2"]
# the prior's tests run eagerly in float32, not this CPU's bf16 + compile default: they stay quick
TINY_PRIOR = ["--max_iters", "4", "--batch_size", "8", "--hidden_size", "32", "--depth", "1",
              "--num_heads", "2", "--log_interval", "2", "--ckpt_interval", "2",
              "--sample_interval", "0", "--dtype", "float32", "--no-compile"]


def command(script, *args):  # a script of the project, run in a fresh process as a user runs it
    return [sys.executable, os.path.join(HERE, script), *map(str, args)]


def run(script, *args, check=True):  # unless check is False, the script must succeed
    proc = subprocess.run(command(script, *args), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 or not check, f"{script} {args}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def assert_one_line_error(proc, *words):
    """A user's mistake: non-zero exit, and one line 'error: ...' that names the problem and the
    fix (after argparse's usage lines, if argparse found it)."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0, proc.stdout
    assert lines and "error:" in lines[-1], proc.stderr
    assert all(line.startswith(("usage:", " ")) for line in lines[:-1]), proc.stderr
    for word in words:
        assert word in lines[-1], (word, lines[-1])
    for quoted in lines[-1].split("`")[1::2]:  # a command it quotes can be pasted as it is
        argv = shlex.split(quoted.split(" && ")[0])
        assert argv[0] == "python", quoted
        assert os.path.isfile(os.path.join(HERE, argv[1])), quoted


def same(a, b):
    """Bit-for-bit equality of nested checkpoint contents."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(map(same, a, b))
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def load(out, name):  # a checkpoint in out, read the safe way
    return torch.load(os.path.join(out, name), weights_only=True)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A tiny run of the whole pipeline (stage 1, stage 2, prior), shared by the tests that read it."""
    out = str(tmp_path_factory.mktemp("pipeline"))
    run("train_ae.py", "--stage", "1", "--out_dir", out, *TINY_AE, "--max_iters", "60", "--warmup_iters", "5")
    run("train_ae.py", "--stage", "2", "--out_dir", out, *TINY_AE)
    run("train_prior.py", "--out_dir", out, *TINY_PRIOR)
    return out


# ---- the data -----------------------------------------------------------------------------------
def test_a_shape_is_a_pure_function_of_seed_split_and_index():
    full, small = data.ShapesDataset("train"), data.ShapesDataset("train", size=50)
    for i in (0, 7, 49):
        assert all(torch.equal(a, b) for a, b in zip(full[i], small[i]))
    assert not torch.equal(small.images, data.ShapesDataset("train", seed=1, size=50).images)  # another seed
    upright = data.ShapesDataset("train", size=50, rotation=0.0)  # the same shapes, upright
    assert torch.equal(upright.labels, small.labels)
    assert torch.equal(upright.factors[:, 3], torch.ones(50))  # cos(angle) = 1


def test_render_iou_rewards_the_ideal_shape_only():
    images, labels, factors = data.load_split(data.ShapesDataset("val", size=600))
    real = evaluate.render_iou(images, labels)
    assert real.mean() > 0.97
    blurred = F.avg_pool2d(F.pad(images, (2, 2, 2, 2), mode="replicate"), 5, stride=1)
    dented = images.clone()
    dented[:, :, 14:18, 12:20] = -1  # a hole across the middle
    for damaged, damaged_labels in [(blurred, labels), (dented, labels), (images, (labels + 1) % 3)]:
        assert evaluate.render_iou(damaged, damaged_labels).mean() < real.mean() - 0.04
    stray = images.clone()
    stray[:, :, 1, 1] = 1.0  # one white pixel in a corner
    assert evaluate.render_iou(stray, labels).mean().item() == pytest.approx(real.mean().item(), abs=0.005)
    white_and_black = torch.cat([torch.ones(3, 1, 32, 32), -torch.ones(3, 1, 32, 32)])
    assert evaluate.render_iou(white_and_black, torch.tensor([0, 1, 2, 0, 1, 2])).max() == 0


def test_step_sampler_shards_resumes_and_covers_an_epoch():
    one = list(data.StepSampler(100, 16, seed=0, start_step=0, max_steps=20))
    rank0, rank1 = [list(data.StepSampler(100, 8, 0, 0, 20, rank=r, world_size=2)) for r in (0, 1)]
    assert [a + b for a, b in zip(rank0, rank1)] == one  # two ranks together: one process's batch
    assert list(data.StepSampler(100, 16, seed=0, start_step=7, max_steps=20)) == one[7:]
    assert len(set(sum(one[:6], []))) == 96  # an epoch (6 steps of 16) has no repeats


# ---- the autoencoder and the DAE's two stages ---------------------------------------------------
def test_the_decoder_reads_a_noisy_or_a_pooled_latent():
    decoded, ae = [], Autoencoder()
    ae.decode = lambda z: decoded.append(z) or z  # keep what the decoder is given
    for spread in (1.0, 10.0):  # a latent ten times larger gets ten times the noise
        mean = spread * torch.randn(8, 4, 8, 8)
        ae.encode = lambda x: (mean, torch.full_like(mean, 1e-3))
        ae(torch.zeros(8, 1, 32, 32), latent_noise=0.5)
        assert (decoded[-1] - mean).std().item() == pytest.approx(0.5 * spread, rel=0.1)
    ae(torch.zeros(8, 1, 32, 32), pool=2)  # --scale_equiv: each 2x2 block of the latent averaged
    assert torch.allclose(decoded[-1], mean.unflatten(3, (4, 2)).unflatten(2, (4, 2)).mean((3, 5)), atol=0.01)


def test_stage_2_keeps_stage_1s_encoder_and_scales_latents(pipeline):
    stage1, final = load(pipeline, "ae_stage1.pt"), load(pipeline, "ae.pt")
    latents = load(pipeline, "latents.pt")
    assert (stage1["step"], final["stage"], final["step"]) == (60, "2", 4)
    assert load(pipeline, "prior_guide.pt")["step"] == 1  # autoguidance's weaker prior: a fifth of the run
    encoder_keys = [k for k in final["model"] if k.startswith(("encoder.", "quant_conv."))]
    assert all(torch.equal(stage1["model"][k], final["model"][k]) for k in encoder_keys)
    assert latents["mean"].shape == (20_000, 4, 8, 8)
    assert torch.equal(latents["labels"], data.ShapesDataset().labels)  # in dataset order
    z = (latents["mean"] + latents["std"] * torch.randn_like(latents["std"])) * latents["latent_scale"]
    assert z.std().item() == pytest.approx(1.0, rel=0.05)  # scaled to unit variance
    runs = [(row["run"], row["step"]) for row in map(json.loads, open(os.path.join(pipeline, "log.jsonl")))]
    assert runs == [("ae stage 1", s) for s in range(2, 61, 2)] + [
        ("ae stage 2", 2), ("ae stage 2", 4), ("prior", 2), ("prior", 4)]


def test_stage_1_has_the_weak_decoder_and_stage_2_a_full_one(tmp_path):
    weak = ["--aux_width", "0.5", "--aux_dropout", "0.2"]
    stage1 = run("train_ae.py", "--stage", "1", "--out_dir", tmp_path, *TINY_AE, *weak).stdout
    assert "(width 0.5, dropout 0.2)" in stage1  # the decoder as built, not as asked
    resumed = run("train_ae.py", "--stage", "1", "--out_dir", tmp_path, *TINY_AE, "--max_iters", "6", "--resume").stdout
    assert "(width 0.5, dropout 0.2)" in resumed  # taken from the checkpoint
    contradiction = ["--max_iters", "8", "--resume", "--aux_dropout", "0.7"]
    assert_one_line_error(run("train_ae.py", "--stage", "1", "--out_dir", tmp_path, *TINY_AE, *contradiction,
                              check=False), "--aux_dropout")
    older = {k: v for k, v in load(tmp_path, "ae_stage1.pt")["config"].items() if k != "scale_equiv"}
    edit(tmp_path, "ae_stage1.pt", config=older)  # as written before --scale_equiv existed (off then)
    assert "(width 1, dropout 0)" in run("train_ae.py", "--stage", "2", "--out_dir", tmp_path, *TINY_AE).stdout
    assert load(tmp_path, "ae.pt")["config"]["scale_equiv"] == 0.0  # not today's default, 0.5
    first_conv = "decoder.layers.0.weight"  # (channels out, z_channels, 3, 3)
    assert load(tmp_path, "ae_stage1.pt")["model"][first_conv].shape[0] == 32
    assert load(tmp_path, "ae.pt")["model"][first_conv].shape[0] == 64
    assert load(tmp_path, "ae.pt")["config"]["aux_width"] == 0.5  # the class that shaped the latent


def test_joint_baseline_with_a_gan_and_eq_in_bf16_runs_downstream(tmp_path):
    run("train_ae.py", "--stage", "joint", "--out_dir", tmp_path, *TINY_AE, "--dtype", "bfloat16",
        "--gan_weight", "0.1")  # EQ by default (--scale_equiv 0.5; --seed 0: the third step is pooled)
    ae = load(tmp_path, "ae.pt")
    assert (ae["stage"], ae["config"]["scale_equiv"]) == ("joint", 0.5)
    assert "discriminator" in ae
    assert ae["config"]["aux_dropout"] is None  # no stage used an auxiliary decoder
    run("train_prior.py", "--out_dir", tmp_path, *TINY_PRIOR, "--compile", "--dtype", "bfloat16")
    assert not any("_orig_mod" in k for k in load(tmp_path, "prior.pt")["model"])
    run("sample.py", "--out_dir", tmp_path, "--num_samples", "2", "--steps", "2")


# ---- the DiT prior ------------------------------------------------------------------------------
def small_dit(randomise=False, **kw):
    """A tiny DiT. adaLN-Zero makes a fresh one output exactly 0: `randomise` fills the zeroed layers."""
    torch.manual_seed(1)  # the same weights in every process
    config = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
                  num_classes=3, learn_sigma=False)
    dit = DiT(**{**config, **kw})
    for p in dit.parameters():
        if randomise and p.requires_grad and not p.any():
            p.data.normal_(std=0.05)
    return dit


def test_dit_state_dict_has_the_original_names_and_shapes():
    dit, D = small_dit(learn_sigma=True), 64
    block = {"attn.qkv": (3 * D, D), "attn.proj": (D, D), "mlp.fc1": (4 * D, D),
             "mlp.fc2": (D, 4 * D), "adaLN_modulation.1": (6 * D, D)}
    expected = {"x_embedder.proj.weight": (D, 4, 2, 2), "t_embedder.mlp.0.weight": (D, 256),
                "t_embedder.mlp.2.weight": (D, D), "final_layer.linear.weight": (2 * 2 * 8, D),
                "final_layer.adaLN_modulation.1.weight": (2 * D, D)}
    expected |= {f"blocks.{n}.{name}.weight": shape for n in range(2) for name, shape in block.items()}
    expected |= {k.replace("weight", "bias"): shape[:1] for k, shape in expected.items()}
    expected |= {"pos_embed": (1, 16, D), "y_embedder.embedding_table.weight": (3 + 1, D)}
    assert {k: tuple(v.shape) for k, v in dit.state_dict().items()} == expected


def test_patches_round_trip_and_token_k_reads_patch_k():
    dit, x = small_dit(), torch.randn(3, 4, 8, 8)
    assert torch.equal(dit.unpatchify(rearrange(x, "n c (h p) (w q) -> n (h w) (p q c)", p=2, q=2)), x)
    moved = x.clone()
    moved[:, :, 2:4, 4:6] += 1.0  # the patch in row 1, column 2 of the 4x4 grid: token 6
    changed = (dit.x_embedder(moved) - dit.x_embedder(x)).abs().sum(-1)[0]
    assert changed.nonzero().flatten().tolist() == [6]
    pos = dit.pos_embed[0]  # the first half of the features encodes the column, the second the row
    assert torch.equal(pos[0, 32:], pos[1, 32:])  # tokens 0 and 1: the same row
    assert not torch.equal(pos[0, 32:], pos[4, 32:])  # token 4: the next row


def test_adaln_zero_starts_every_block_as_the_identity():
    block, x = DiTBlock(64, 4), torch.randn(2, 16, 64)
    for p in block.adaLN_modulation[-1].parameters():
        torch.nn.init.zeros_(p)
    assert torch.equal(block(x, torch.randn(2, 64)), x)
    out = small_dit()(torch.randn(2, 4, 8, 8), torch.tensor([3, 5]), torch.tensor([0, 1]))
    assert torch.equal(out, torch.zeros(2, 4, 8, 8))


def test_the_dit_reads_t_and_y_and_compiles_to_the_same_function():
    dit, x = small_dit(True).eval(), torch.randn(2, 4, 8, 8)
    t, y = torch.tensor([10, 10]), torch.tensor([0, 0])
    out = dit(x, t, y)
    assert not torch.allclose(out, dit(x, t + 490, y))
    assert not torch.allclose(out, dit(x, t, y + 1))
    assert torch.allclose(torch.compile(dit)(x, t, y), out, atol=1e-5)  # GELU in its sigmoid form
    dit.y_embedder.dropout_prob = 1.0  # training with certain label dropout: every label "no class"
    assert torch.equal(dit.train()(x, t, torch.tensor([0, 1])), dit(x, t, torch.tensor([3, 3])))


def test_fused_attention_equals_the_written_out_softmax():
    attn, x = Attention(64, 4), torch.randn(2, 16, 64)
    q, k, v = rearrange(attn.qkv(x), "n t (three h d) -> three n h t d", three=3, h=4)
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(16), dim=-1)
    reference = attn.proj(rearrange(weights @ v, "n h t d -> n t (h d)"))
    assert torch.allclose(attn(x), reference, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 on a cpu: attention runs in float32
        assert torch.allclose(attn(x).float(), reference, atol=0.05)


# ---- diffusion ----------------------------------------------------------------------------------
def test_q_sample_follows_the_float32_schedule_and_ddim_walks_999_to_0():
    diffusion = GaussianDiffusion()
    assert diffusion.alphas_cumprod.dtype == torch.float32
    x0, noise, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([0, 500, 999])
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)[t].float().view(-1, 1, 1, 1)
    expected = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    assert torch.allclose(diffusion.q_sample(x0, t, noise), expected, atol=1e-6)
    for steps in (2, 50, 1000):
        times = diffusion.ddim_timesteps(steps)
        assert (len(times), times[0], times[-1]) == (steps, 999, 0)
        assert all(a > b for a, b in zip(times, times[1:]))


def test_guidance_mixes_two_predictions_below_its_boundary():
    diffusion, dit = GaussianDiffusion(), small_dit(True).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([300, 300]), torch.tensor([0, 2])
    cond, uncond = dit(x, t, y), dit(x, t, torch.tensor([3, 3]))
    assert torch.equal(diffusion.guided_eps(dit, x, t, y, 1.0, null_label=3), cond)
    guided = diffusion.guided_eps(dit, x, t, y, 4.0, null_label=3)
    assert torch.allclose(guided, uncond + 4.0 * (cond - uncond), atol=1e-5)
    assert (guided - cond).abs().amax(dim=(0, 2, 3)).min() > 1e-4  # every channel guided
    weak = small_dit(True, hidden_size=32).eval()  # autoguidance: a weaker model instead of "no class"
    reference = weak(x, t, y)
    assert torch.allclose(diffusion.guided_eps(dit, x, t, y, 4.0, 3, weak), reference + 4.0 * (cond - reference))
    runs = [diffusion.ddim_sample(dit, x, y, 4, cfg_scale=4.0, null_label=3, guide_below=b)
            for b in (0, 500, 1000)]
    assert torch.equal(runs[0], diffusion.ddim_sample(dit, x, y, 4))  # nothing guided
    assert not runs[1].equal(runs[0])
    assert not runs[1].equal(runs[2])


@pytest.mark.parametrize("steps,eta", [(1000, 1.0), (1000, 0.0), (50, 1.0), (50, 0.0)])
def test_the_sampler_reaches_a_gaussian_whose_denoiser_is_known(steps, eta):
    diffusion, mean, std = GaussianDiffusion(), 0.7, 0.5

    def model(x, t, y):
        # data ~ N(mean, std^2) makes x_t ~ N(sqrt(abar) mean, abar std^2 + 1 - abar): the optimal
        abar = diffusion.alphas_cumprod[t].view(-1, 1)
        return (1 - abar).sqrt() * (x - abar.sqrt() * mean) / (abar * std ** 2 + 1 - abar)  # E[noise | x_t]

    g = torch.Generator().manual_seed(0)
    noise, y = torch.randn(20_000, 1, generator=g), torch.zeros(20_000, dtype=torch.long)
    x = diffusion.ddim_sample(model, noise, y, steps, eta, generator=g)  # (1000, 1): DDPM
    assert x.mean().item() == pytest.approx(mean, abs=0.02)
    if steps == 1000:
        assert x.std().item() == pytest.approx(std, rel=0.03)
    else:  # 50 coarse steps lose a little variance: within 15 %, never above the target
        assert 0.85 * std < x.std().item() < std


# ---- training: accumulation, non-finite steps, precision ----------------------------------------
def test_an_accumulated_step_equals_one_step_of_the_whole_batch(pipeline, tmp_path):
    args = [*TINY_PRIOR, "--max_iters", "1", "--class_dropout_prob", "0"]  # (label dropout: per micro)
    for name, batch in [("whole", ["--batch_size", "16"]), ("accumulated", ["--batch_size", "8", "--grad_accum", "2"])]:
        shutil.copytree(pipeline, tmp_path / name, ignore=lambda folder, names: set(names) - {"latents.pt"})
        run("train_prior.py", "--out_dir", tmp_path / name, *args, *batch)
    whole, accumulated = load(tmp_path, "whole/prior.pt"), load(tmp_path, "accumulated/prior.pt")
    for key, value in whole["model"].items():
        assert torch.allclose(value, accumulated["model"][key], atol=1e-6), key


def test_a_non_finite_step_never_reaches_the_weights():
    weight = torch.nn.Parameter(torch.ones(3))
    weight.grad = torch.tensor([1.0, math.nan, 2.0])
    guard = plumbing.FiniteGuard("cpu", 1, "prior.pt", 1e-3)
    guard.check(torch.tensor(0.5), weight.grad.norm(), [weight], step=7)
    assert torch.equal(weight.grad, torch.zeros(3))  # the optimizer sees nothing of it
    with pytest.raises(SystemExit, match="not finite at step 7, .*prior.pt: lower --lr"):
        guard.verify()


def test_a_non_finite_discriminator_step_stops_the_run(tmp_path):
    # F.relu is used by the discriminator's hinge loss alone: make it NaN there
    script = ("import runpy, sys, torch.nn.functional as F; F.relu = lambda x, inplace=False: x * float('nan'); "
              f"sys.argv = ['train_ae.py', '--stage', '1', '--out_dir', '{tmp_path}', '--gan_weight', '0.1', "
              "'--max_iters', '4', '--batch_size', '8', '--ckpt_interval', '1']; "
              f"runpy.run_path('{HERE}/train_ae.py', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert_one_line_error(proc, "not finite at step 0")
    assert not os.path.exists(tmp_path / "ae_stage1.pt")


def test_autocast_is_fresh_and_the_evaluator_float32():
    _, autocast = plumbing.precision("cpu", "bfloat16")
    with autocast():
        with autocast():  # nested, as sampling then decoding once were
            pass
        assert torch.is_autocast_enabled("cpu")
    assert not torch.is_autocast_enabled("cpu")
    split = images, _, _ = data.load_split(data.ShapesDataset("val", size=200))
    plain, _ = evaluate.train_evaluator(split, split, (1, 32, 32), 3, steps=5)
    with autocast():  # the caller's bf16 autocast changes neither training nor features
        under, _ = evaluate.train_evaluator(split, split, (1, 32, 32), 3, steps=5)
        features = evaluate.features(under, images)
    assert same(plain.state_dict(), under.state_dict())
    assert torch.equal(features, evaluate.features(plain, images))


# ---- the distance and the scores ----------------------------------------------------------------
def test_capacity_curve_ranks_a_poorer_latent_worse():
    images = data.load_split(data.ShapesDataset("train", size=2048))[0]
    latents = {"8x8 means": lambda x: F.avg_pool2d(x, 4).repeat(1, 4, 1, 1),  # the image, pooled
               "2x2 means": lambda x: F.interpolate(F.avg_pool2d(x, 16), scale_factor=4).repeat(1, 4, 1, 1),
               "noise": lambda x: torch.randn(x.shape[0], 4, 8, 8)}  # nothing of the image

    def bound(latent, **options):
        return distance.capacity_curve(latent, images[:1792], images[1792:], **options)[0]

    l1 = {name: bound(latent, classes=(0.25,), steps=200)["l1"] for name, latent in latents.items()}
    assert l1["8x8 means"] < l1["2x2 means"] < l1["noise"]
    row = bound(latents["8x8 means"], classes=(0.25,), steps=600, patience=1, check_every=100)
    assert 200 < row["kept_step"] <= row["steps"] <= 600  # it trains on while it gains
    assert row["l1"] < l1["8x8 means"]
    row = bound(latents["8x8 means"], classes=(0.125,), steps=10_000, lr=1e-12, patience=1, check_every=20)
    assert (row["kept_step"], row["steps"]) == (20, 80)  # a rate too small to move: 3 drops end it


def exact_samples(mean, cov, n, generator):  # n points whose sample mean and covariance are exactly these
    x = torch.randn(n, len(mean), generator=generator, dtype=torch.float64)
    x = x - x.mean(0)
    x = x @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(x.T))).T  # covariance I
    return x @ torch.linalg.cholesky(cov).T + mean


def test_frechet_distance_matches_an_independent_computation():
    g = torch.Generator().manual_seed(0)
    mean_a, mean_b = torch.tensor([0.0, 1.0], dtype=torch.float64), torch.tensor([2.0, 0.0], dtype=torch.float64)
    cov_a = torch.tensor([[2.0, 1.0], [1.0, 1.0]], dtype=torch.float64)  # A B != B A
    cov_b = torch.tensor([[1.0, -0.5], [-0.5, 2.0]], dtype=torch.float64)
    a, b = exact_samples(mean_a, cov_a, 500, g), exact_samples(mean_b, cov_b, 700, g)
    # tr((A B)^(1/2)) from the eigenvalues of the non-symmetric product, with numpy
    eigenvalues = np.linalg.eigvals(cov_a.numpy() @ cov_b.numpy()).real
    expected = 5.0 + 3.0 + 3.0 - 2 * np.sqrt(eigenvalues).sum()
    assert evaluate.frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    with pytest.raises(SystemExit, match="NaN"):
        evaluate.frechet_distance(torch.full((5, 2), math.nan), a)


def test_eval_scores_unpaired_and_distance_reuses_the_evaluator(pipeline, tmp_path):
    out = str(shutil.copytree(pipeline, tmp_path / "out"))
    run("sample.py", "--out_dir", out, "--eval", "--num_samples", "64", "--steps", "2", "--eval_steps", "30")
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    scores = metrics["scores"]
    assert (metrics["split"], metrics["num_samples"], metrics["num_reference"]) == ("val", 64, 2000)
    assert metrics["fd_real"] < metrics["fd_gaussian"]  # real test images beat a Gaussian prior
    assert scores["DiT samples"]["render_iou"] < scores["reconstructions"]["render_iou"]
    proc = run("distance.py", "--out_dir", out, "--steps", 5, "--patience", 1, "--num_train", 256,
               "--eval_steps", 30, "--seed", 1)
    assert "training the evaluator" not in proc.stdout  # --eval's evaluator, whatever --seed
    result = json.load(open(os.path.join(out, "distance.json")))
    rows = result["rows"]
    assert [(r["width"], r["dropout"]) for r in rows] == [(0.125, 0), (0.25, 0), (0.5, 0), (1, 0), (1, 0.2)]
    assert result["reference"]["fd"] == pytest.approx(metrics["fd_real"])  # the same floor
    run("sample.py", "--out_dir", out, "--eval", "--num_samples", "32", "--steps", "1", "--class_label", "2")
    only_triangles = json.load(open(os.path.join(out, "metrics.json")))["scores"]["DiT samples"]
    assert only_triangles["render_iou_per_class"][:2] == [None, None]  # null, not NaN, for the others


def test_probe_scores_are_unpaired_against_the_other_split(pipeline):
    state = load(pipeline, "ae.pt")
    train_set, val_set, test_set, shape, classes = data.dataset_of(state["config"])
    args = type("Args", (), {"out_dir": pipeline, "device": "cpu", "eval_steps": 30})
    eval_images = data.load_split(val_set)[0]
    score, reference = distance.unpaired_scores(args, state["config"], train_set, val_set, shape,
                                                classes, eval_images, data.load_split(test_set), True)
    perfect = score(lambda images: images)  # a probe that reconstructs every image exactly
    assert perfect["fd"] == pytest.approx(reference["fd"])  # the floor: not 0, as paired would be


def test_sample_is_seeded_writes_npz_and_runs_ddpm_without_ema(pipeline, tmp_path):
    out = str(shutil.copytree(pipeline, tmp_path / "out"))
    a, b, npz = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "s.npz"
    fast = ["--out_dir", out, "--num_samples", "6", "--steps", "3"]
    assert "autoguidance 5.0 below t=500" in run("sample.py", *fast, "--output", a, "--save_npz", npz).stdout
    run("sample.py", *fast, "--output", b, "--seed", "1")
    assert open(a, "rb").read() != open(b, "rb").read()  # another seed, other samples
    run("sample.py", *fast, "--output", b, "--no_ema")
    assert open(a, "rb").read() != open(b, "rb").read()  # the raw weights are not the EMA's
    pixels = np.load(npz)["arr_0"]  # the FID suites' layout: uint8 (N, H, W, C)
    assert (pixels.shape, pixels.dtype) == ((6, 32, 32, 1), np.uint8)
    assert "ddpm, 1000 steps" in run("sample.py", "--out_dir", out, "--num_samples", "2", "--sampler", "ddpm").stdout


# ---- bad input: one line, a non-zero exit, and every file in out_dir byte-for-byte unchanged ----
def edit(out, name, **changes):  # change some entries of a checkpoint in out
    torch.save({**load(out, name), **changes}, os.path.join(out, name))


# one representative per kind of failure: (how to break out_dir, script, arguments, words of the error)
BAD_INPUT = {
    "stage2_without_stage1": (lambda o: os.remove(f"{o}/ae_stage1.pt"), "train_ae.py", ["--stage", "2"], ["--stage 1"]),
    "truncated_checkpoint": (lambda o: open(f"{o}/ae.pt", "r+b").truncate(5000), "sample.py", [], ["readable"]),
    "code_in_checkpoint": (lambda o: torch.save({"kind": "prior", "x": torch.nn.ReLU()}, f"{o}/prior.pt"),
                           "sample.py", [], ["readable"]),
    "prior_as_autoencoder": (lambda o: shutil.copy(f"{o}/prior.pt", f"{o}/ae.pt"), "sample.py", [], ["'prior'"]),
    "latent_shape_mismatch": (lambda o: edit(o, "prior.pt", latent_shape=[8, 8, 8]), "sample.py", [], ["retrain"]),
    "foreign_latents_for_eval": (lambda o: edit(o, "latents.pt", fingerprint="0" * 16), "sample.py",
                                 ["--eval", "--num_samples", "4", "--steps", "1"], ["latents.pt"]),
    "architecture_mismatch": (None, "train_ae.py", ["--stage", "2", "--ch", "8"], ["--ch"]),
    "aux_options_in_joint": (None, "train_ae.py", ["--stage", "joint", "--aux_dropout", "0.3"], ["--aux_dropout"]),
    "cfg_on_unconditional": (lambda o: edit(o, "prior.pt", num_classes=0), "sample.py",
                             ["--guidance", "cfg", "--cfg_scale", "3"], ["uncondit"]),
    "batch_size_0": (None, "train_ae.py", ["--stage", "1", "--batch_size", "0"], ["--batch_size", "positive"]),
    "dataset_files_missing": (None, "train_ae.py", ["--stage", "1", "--data", "mnist", "--data_dir", "OUT"],
                              ["--download"]),
    "out_dir_is_a_file": (None, "train_prior.py", ["--out_dir", "FILE"], ["is a file"]),
    "no_cuda_here": (None, "sample.py", ["--device", "cuda:7"], ["this machine has", "cpu"]),
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


# ---- reliability and scale: seeds, exact resume, Ctrl-C, DDP ----------------------------------
RESUME = {  # case: (script, the files it needs from the pipeline, arguments, its checkpoint)
    "ae_stage2": ("train_ae.py", ["ae_stage1.pt"], ["--stage", "2"], "ae.pt"),
    "prior": ("train_prior.py", ["ae.pt", "latents.pt"], TINY_PRIOR[2:], "prior.pt"),
    "prior_bf16": ("train_prior.py", ["ae.pt", "latents.pt"], [*TINY_PRIOR[2:], "--dtype", "bfloat16"], "prior.pt"),
}


@pytest.mark.parametrize("case", RESUME)
def test_resume_after_sigkill_is_exact(case, pipeline, tmp_path):
    script, needs, args, ckpt = RESUME[case]
    args = [*args, "--max_iters", "24", "--batch_size", "16", "--ckpt_interval", "4", "--log_interval", "4"]
    once, killed = str(tmp_path / "once"), str(tmp_path / "killed")
    for out in (once, killed):  # each starts from only the files the script needs
        shutil.copytree(pipeline, out, ignore=lambda folder, names: [n for n in names if n not in needs])
    run(script, "--out_dir", once, *args)
    proc = subprocess.Popen(command(script, "--out_dir", killed, *args), stdout=subprocess.DEVNULL)
    while not os.path.exists(os.path.join(killed, ckpt)):
        assert proc.poll() is None, "finished before the first checkpoint"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)  # a real kill: no clean-up code runs
    assert proc.wait() == -signal.SIGKILL
    killed_at = load(killed, ckpt)["step"]
    assert 4 <= killed_at < 24
    assert f"steps {killed_at} -> 24" in run(script, "--out_dir", killed, *args, "--resume").stdout
    # weights, EMA, moments, step and loss: bit-identical (the config differs by --resume)
    assert same({**load(once, ckpt), "config": 0}, {**load(killed, ckpt), "config": 0})


def test_ctrl_c_saves_and_says_how_to_resume(pipeline, tmp_path):
    shutil.copy(os.path.join(pipeline, "latents.pt"), tmp_path)
    argv = command("train_prior.py", "--out_dir", tmp_path, *TINY_PRIOR[2:], "--max_iters", "100000")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True,  # SIGINT as a terminal sends it:
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120  # a crash, or a hang, ends the wait
    while not os.path.exists(os.path.join(tmp_path, "prior.pt")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    stdout = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130
    assert f"saved step {load(tmp_path, 'prior.pt')['step']} " in stdout
    assert "--resume" in stdout


@pytest.mark.parametrize("script", ["train_ae.py", "train_prior.py"])
def test_torchrun_two_processes_end_with_the_same_weights(script, pipeline, tmp_path):
    args = ["--stage", "1", *TINY_AE, "--gan_weight", "0.1"] if script == "train_ae.py" else TINY_PRIOR
    shutil.copy(os.path.join(pipeline, "latents.pt"), tmp_path)  # what train_prior.py reads
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.join(HERE, script), "--out_dir", tmp_path, *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    number = r"(-?[0-9][0-9.e+-]*)"  # two processes share the pipe: read numbers only
    start = re.findall(r"initial checksum " + number, proc.stdout)
    end = re.findall(rf"parameter checksum {number} \| own loss {number}", proc.stdout)
    assert len(start) == len(end) == 2  # each rank reports both
    assert start[0] == start[1]  # both ranks start from the same weights
    assert end[0][0] == end[1][0] != start[0]  # and end with the same weights, trained
    assert proc.stdout.count("step 4/4") == 1  # rank 0 alone logs
    own = [float(loss) for _, loss in end]  # different shards, different losses; the log: their mean
    logged = float(re.search(r"step 4/4 \| loss (\S+)", proc.stdout).group(1))
    assert own[0] != own[1]
    assert logged == pytest.approx(sum(own) / 2, abs=1e-4)
    written = {"ae_stage1.pt", "recon_stage1.png"} if script == "train_ae.py" else {"prior.pt", "prior_guide.pt"}
    assert set(os.listdir(tmp_path)) == {"latents.pt", "log.jsonl"} | written  # one writer


def ddp_gradient_worker(rank, init_file, batch, result_file):  # one of 2: DDP's gradient of half the batch
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    model = torch.nn.parallel.DistributedDataParallel(small_dit(True, class_dropout_prob=0.0))
    x, t, y, target = [part.chunk(2)[rank] for part in batch]
    F.mse_loss(model(x, t, y), target).backward()
    if rank == 0:
        torch.save([p.grad for p in model.module.parameters()], result_file)
    torch.distributed.barrier()  # leave together, and skip gloo's C++ teardown (CI saw it abort)
    os._exit(0)


def test_ddp_gradient_equals_one_process_on_the_whole_batch(tmp_path):
    g = torch.Generator().manual_seed(0)  # the random draws of the step, fixed up front
    batch = [torch.randn(8, 4, 8, 8, generator=g), torch.randint(0, 1000, (8,), generator=g),
             torch.randint(0, 3, (8,), generator=g), torch.randn(8, 4, 8, 8, generator=g)]
    torch.multiprocessing.spawn(ddp_gradient_worker, (str(tmp_path / "init"), batch, str(tmp_path / "g.pt")),
                                nprocs=2)
    model = small_dit(True, class_dropout_prob=0.0)
    F.mse_loss(model(*batch[:3]), batch[3]).backward()
    ddp_grads = torch.load(tmp_path / "g.pt", weights_only=True)
    pairs = [(p.grad, q) for p, q in zip(model.parameters(), ddp_grads) if p.requires_grad]
    assert all(torch.allclose(p, q, atol=1e-6, rtol=1e-4) for p, q in pairs)


def test_nan_on_one_rank_stops_every_rank(pipeline, tmp_path):
    latents = load(pipeline, "latents.pt")
    rank1_step2 = next(iter(data.StepSampler(len(latents["labels"]), 8, 0, 2, 3, rank=1, world_size=2)))
    latents["mean"][rank1_step2[0]] = math.nan  # one bad latent, in rank 1's share of step 2 only
    torch.save(latents, tmp_path / "latents.pt")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.join(HERE, "train_prior.py"), "--out_dir", tmp_path, *TINY_PRIOR],
                          capture_output=True, text=True, timeout=240)  # a rank left waiting would hang
    assert proc.stderr.count("not finite at step 2, in at least one process") == 2
    prior = load(tmp_path, "prior.pt")
    assert prior["step"] == 2
    assert all(torch.isfinite(v).all() for v in [*prior["model"].values(), *prior["ema"].values()])


# ---- after the first run: your own images, a prior without label dropout ------------------------
def test_a_flat_image_folder_is_one_unlabelled_class(tmp_path):
    from PIL import Image
    pictures = tmp_path / "pictures"  # a user's own images: no class sub-folders
    os.makedirs(pictures)
    for i in range(12):
        Image.new("RGB", (20 + i, 24), (20 * i, 100, 30)).save(pictures / f"{i}.png")
    out = tmp_path / "out"
    own = ["--data", "folder", "--data_dir", pictures, "--image_size", "16", "--channels", "3",
           "--ch", "8", "--ch_mult", "1,2", "--aux_dropout", "0.3", "--scale_equiv", "0.25"]
    pickle.dumps(data.get_dataset("folder", str(pictures), 16, 3)[0])  # as spawned workers must
    assert "one unlabelled class" in run("train_ae.py", "--stage", "1", "--out_dir", out, *own, *TINY_AE).stdout
    stage2 = run("train_ae.py", "--stage", "2", "--out_dir", out, *TINY_AE).stdout  # nothing repeated
    for option in ("--data folder", "--ch_mult 1,2 ", "--aux_dropout 0.3", "--scale_equiv 0.25"):
        assert option in stage2
    prior = run("train_prior.py", "--out_dir", out, *TINY_PRIOR, "--class_dropout_prob", "0").stdout
    assert "unconditional" in prior
    assert load(out, "prior.pt")["num_classes"] == 0
    run("sample.py", "--out_dir", out, "--num_samples", "2", "--steps", "2")
    assert_one_line_error(run("sample.py", "--out_dir", out, "--eval", check=False), "--save_npz")
    assert "only the L1 bound" in run("distance.py", "--out_dir", out, "--steps", "2", "--widths", "0.5").stdout
