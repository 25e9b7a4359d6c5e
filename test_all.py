"""Tests for the whole project: `python -m pytest -q test_all.py` (cpu, offline, a few minutes)."""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

import data
from model import Autoencoder, Decoder, DiT, DiTBlock, GaussianDiffusion, Attention

HERE = os.path.dirname(os.path.abspath(__file__))
TINY_AE = ["--max_iters", "4", "--batch_size", "8", "--log_interval", "2", "--ckpt_interval", "2"]
TINY_PRIOR = ["--max_iters", "4", "--batch_size", "8", "--hidden_size", "32", "--depth", "1", "--num_heads", "2",
              "--log_interval", "2", "--ckpt_interval", "2", "--sample_interval", "0"]


def run(script, *args, check=True):
    """Run one of the project's scripts in a fresh process, as a user would."""
    proc = subprocess.run([sys.executable, os.path.join(HERE, script), *map(str, args)],
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {args} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def assert_one_line_error(proc, *words):
    """A user error: non-zero exit, one line on stderr that starts with 'error:' and names the fix."""
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A tiny run of the whole pipeline (stage 1, stage 2, prior), shared by the tests that read it."""
    out = str(tmp_path_factory.mktemp("pipeline"))
    run("train_ae.py", "--stage", "1", "--out_dir", out, *TINY_AE)
    run("train_ae.py", "--stage", "2", "--out_dir", out, *TINY_AE)
    run("train_prior.py", "--out_dir", out, *TINY_PRIOR)
    return out


# -----------------------------------------------------------------------------
# data


def test_shapes_dataset_is_a_pure_function_of_seed_and_index():
    full, small = data.ShapesDataset("train"), data.ShapesDataset("train", size=50)
    assert len(full) == 20_000 and len(data.ShapesDataset("heldout")) == 2_000
    for i in (0, 7, 49):
        assert all(torch.equal(a, b) for a, b in zip(full[i], small[i]))
    other_seed, heldout = data.ShapesDataset("train", seed=1, size=50), data.ShapesDataset("heldout", size=50)
    assert not torch.equal(small.images, other_seed.images) and not torch.equal(small.images, heldout.images)
    image, label, factors = full[3]
    assert image.shape == (1, 32, 32) and factors.shape == (len(data.FACTOR_NAMES),)
    assert image.min() >= -1 and image.max() <= 1 and 0 <= label < 3
    assert set(full.labels.tolist()) == {0, 1, 2}
    # anti-aliased: edge pixels take values between background and the shape's intensity
    assert ((full.images > -0.95) & (full.images < full.factors[:, 5].view(-1, 1, 1, 1) * 2 - 1.05)).any()


def test_shapes_factors_move_the_picture():
    labels, base = torch.tensor([1]), torch.tensor([[0.0, 0.0, 0.4, 1.0, 0.0, 1.0]])
    image = data.render_shapes(labels, base, 32)
    for column, value in [(0, 0.2), (1, 0.2), (2, 0.5), (4, 1.0), (5, 0.5)]:  # x, y, scale, rotation, intensity
        moved = base.clone()
        moved[0, column] = value
        assert not torch.allclose(image, data.render_shapes(labels, moved, 32)), column


def test_folder_dataset_resizes_and_converts(tmp_path):
    from PIL import Image
    for cls, size in [("cats", (40, 50)), ("cats", (64, 64)), ("dogs", (20, 20)), ("dogs", (33, 17))] * 3:
        os.makedirs(tmp_path / cls, exist_ok=True)
        n = len(os.listdir(tmp_path / cls))
        Image.new("RGB", size, (200, 10, 10)).save(tmp_path / cls / f"{n}.png")
    for channels in (1, 3):
        train, held, shape, num_classes = data.get_dataset("folder", str(tmp_path), 16, channels)
        assert shape == (channels, 16, 16) and num_classes == 2 and len(train) + len(held) == 12
        image, label, factors = train[0]
        assert image.shape == shape and factors.numel() == 0 and label in (0, 1)
        assert -1 <= image.min() and image.max() <= 1


def test_bad_dataset_requests_fail_in_one_line(tmp_path):
    with pytest.raises(SystemExit, match="unknown dataset"):
        data.get_dataset("imagenet")
    with pytest.raises(SystemExit, match="--download"):
        data.get_dataset("mnist", str(tmp_path))
    with pytest.raises(SystemExit, match="not a directory"):
        data.get_dataset("folder", str(tmp_path / "missing"))


def test_step_sampler_shards_and_resumes():
    one = list(data.StepSampler(100, 16, seed=0, start_step=0, max_steps=20))
    r0 = list(data.StepSampler(100, 8, seed=0, start_step=0, max_steps=20, rank=0, world_size=2))
    r1 = list(data.StepSampler(100, 8, seed=0, start_step=0, max_steps=20, rank=1, world_size=2))
    assert all(a + b == c for a, b, c in zip(r0, r1, one))  # two ranks together = one process's batch
    assert all(not set(a) & set(b) for a, b in zip(r0, r1))  # and they never overlap
    assert list(data.StepSampler(100, 16, seed=0, start_step=7, max_steps=20)) == one[7:]  # resume
    assert len(set(sum(one[:6], []))) == 96  # an epoch (6 steps of 16) has no repeats


def test_lr_schedule_warms_up_then_decays():
    lrs = [data.get_lr(s, 1.0, 10, 100, 0.1) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[100] == pytest.approx(0.1)


# -----------------------------------------------------------------------------
# the autoencoder


def test_autoencoder_shapes_and_weak_decoders():
    ae = Autoencoder()
    x = torch.randn(2, 1, 32, 32)
    mean, std = ae.encode(x)
    assert mean.shape == std.shape == (2, 4, 8, 8) and (std > 0).all()
    recon, kl = ae(x)
    assert recon.shape == x.shape and kl.ndim == 0 and kl >= 0
    rgb = Autoencoder(img_channels=3, ch=8, ch_mult=(1, 2, 2, 2), z_channels=8)
    assert rgb.encode(torch.randn(1, 3, 64, 64))[0].shape == (1, 8, 8, 8)
    params = [sum(p.numel() for p in Decoder(width=w).parameters()) for w in (0.25, 0.5, 1.0)]
    assert params[0] < params[1] < params[2] and params[2] > 8 * params[0]
    dropped = Decoder(dropout=0.5).train()
    z = torch.randn(2, 4, 8, 8)
    assert not torch.equal(dropped(z), dropped(z))  # dropout acts in training mode...
    dropped.eval()
    assert torch.equal(dropped(z), dropped(z))      # ...and not in eval mode


def test_frozen_encoder_gets_no_gradient_and_stays_in_eval_mode():
    ae = Autoencoder(dropout=0.5).freeze_encoder()
    ae.train()  # what the training loop calls: must not wake the encoder up
    assert not ae.encoder.training and ae.decoder.training
    before = {k: v.clone() for k, v in ae.encoder.state_dict().items()}
    opt = torch.optim.AdamW([p for p in ae.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(4, 1, 32, 32)
    mean_before = ae.encode(x)[0]
    recon, kl = ae(x)
    (recon - x).abs().mean().backward()
    opt.step()
    assert all(p.grad is None for p in ae.encoder.parameters())
    assert all(torch.equal(before[k], v) for k, v in ae.encoder.state_dict().items())
    assert torch.equal(mean_before, ae.encode(x)[0])  # deterministic: encoder dropout is off


# -----------------------------------------------------------------------------
# the scripts: DAE stages, joint, resume


def test_two_stage_dae_end_to_end(pipeline):
    stage1 = torch.load(os.path.join(pipeline, "ae_stage1.pt"), weights_only=True)
    final = torch.load(os.path.join(pipeline, "ae.pt"), weights_only=True)
    latents = torch.load(os.path.join(pipeline, "latents.pt"), weights_only=True)
    assert stage1["stage"] == "1" and final["stage"] == "2" and final["step"] == 4
    for name in ("recon_stage1.png", "recon.png", "prior.pt", "prior_samples.png"):
        assert os.path.isfile(os.path.join(pipeline, name)), name
    # stage 2 kept stage 1's encoder bit for bit, and trained a full-width decoder of its own
    encoder_keys = [k for k in final["model"] if k.startswith(("encoder.", "quant_conv."))]
    assert encoder_keys and all(torch.equal(stage1["model"][k], final["model"][k]) for k in encoder_keys)
    # the cached latents: the whole training set, in order, with the latent scale that whitens them
    assert latents["mean"].shape == (20_000, 4, 8, 8) and latents["labels"].shape == (20_000,)
    assert torch.equal(latents["labels"], data.ShapesDataset("train").labels)
    z = latents["mean"] + latents["std"] * torch.randn_like(latents["std"])
    assert (z * latents["latent_scale"]).std().item() == pytest.approx(1.0, rel=0.05)
    assert final["latent_scale"] == latents["latent_scale"] and math.isfinite(final["heldout_psnr"])


def test_joint_baseline_writes_the_same_kind_of_checkpoint(tmp_path):
    out = str(tmp_path)
    run("train_ae.py", "--stage", "joint", "--out_dir", out, *TINY_AE)
    final = torch.load(os.path.join(out, "ae.pt"), weights_only=True)
    assert final["stage"] == "joint" and "latent_scale" in final and os.path.isfile(os.path.join(out, "latents.pt"))
    run("train_prior.py", "--out_dir", out, *TINY_PRIOR)  # downstream runs unchanged on it


def test_resume_continues_from_the_saved_step(tmp_path):
    out = str(tmp_path)
    run("train_ae.py", "--stage", "1", "--out_dir", out, *TINY_AE)
    proc = run("train_ae.py", "--stage", "1", "--out_dir", out, *TINY_AE[2:], "--max_iters", "6", "--resume")
    assert "resuming stage 1 from step 4" in proc.stdout and "steps 4 -> 6" in proc.stdout
    assert torch.load(os.path.join(out, "ae_stage1.pt"), weights_only=True)["step"] == 6


def test_stage_two_needs_stage_one(tmp_path):
    proc = run("train_ae.py", "--stage", "2", "--out_dir", str(tmp_path), check=False)
    assert_one_line_error(proc, "--stage 1")


def test_bad_values_and_broken_checkpoints_fail_in_one_line(tmp_path):
    out = str(tmp_path)
    assert_one_line_error(run("train_ae.py", "--stage", "1", "--batch_size", "0", "--out_dir", out, check=False), "batch_size")
    assert_one_line_error(run("train_ae.py", "--stage", "1", "--max_iters", "-3", "--out_dir", out, check=False), "max_iters")
    assert_one_line_error(run("train_ae.py", "--stage", "1", "--image_size", "30", "--out_dir", out, check=False), "divisible")
    assert_one_line_error(run("train_ae.py", "--stage", "1", "--data", "nope", "--out_dir", out, check=False), "shapes")
    with open(tmp_path / "ae_stage1.pt", "wb") as f:
        f.write(b"\x00not a checkpoint")
    assert_one_line_error(run("train_ae.py", "--stage", "2", "--out_dir", out, check=False), "readable", "--stage 1")
    assert open(tmp_path / "ae_stage1.pt", "rb").read() == b"\x00not a checkpoint"  # nothing overwritten
    # a real stage-1 checkpoint, asked to continue with another architecture
    run("train_ae.py", "--stage", "1", "--out_dir", out, *TINY_AE)
    proc = run("train_ae.py", "--stage", "2", "--out_dir", out, "--ch", "8", *TINY_AE, check=False)
    assert_one_line_error(proc, "--ch")
    assert not os.path.exists(tmp_path / "ae.pt")


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    out = str(tmp_path)
    proc = run("train_ae.py", "--stage", "1", "--out_dir", out, "--lr", "1e30", "--warmup_iters", "1",
               "--grad_clip", "0", "--max_iters", "20", "--batch_size", "8", "--ckpt_interval", "1", check=False)
    assert_one_line_error(proc, "loss became", "--lr")
    state = torch.load(os.path.join(out, "ae_stage1.pt"), weights_only=True)
    assert 1 <= state["step"] < 20


# -----------------------------------------------------------------------------
# the DiT prior


def small_dit(**kw):
    config = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
                  num_classes=3, learn_sigma=False)
    return DiT(**{**config, **kw})


def randomise_zero_layers(model):
    """adaLN-Zero makes a fresh DiT output exactly 0; give the zeroed layers weights to test the wiring."""
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if p.requires_grad and p.abs().sum() == 0:
            p.data.normal_(std=0.05)
    return model


def test_dit_state_dict_matches_the_original_layout():
    dit = small_dit(learn_sigma=True, depth=2)
    shapes = {k: tuple(v.shape) for k, v in dit.state_dict().items()}
    D, p, C = 64, 2, 4
    expected = {"pos_embed": (1, 16, D), "x_embedder.proj.weight": (D, C, p, p), "x_embedder.proj.bias": (D,),
                "t_embedder.mlp.0.weight": (D, 256), "t_embedder.mlp.2.weight": (D, D),
                "y_embedder.embedding_table.weight": (3 + 1, D),
                "final_layer.linear.weight": (p * p * 2 * C, D), "final_layer.adaLN_modulation.1.weight": (2 * D, D)}
    for n in range(2):
        expected.update({f"blocks.{n}.attn.qkv.weight": (3 * D, D), f"blocks.{n}.attn.proj.weight": (D, D),
                         f"blocks.{n}.mlp.fc1.weight": (4 * D, D), f"blocks.{n}.mlp.fc2.weight": (D, 4 * D),
                         f"blocks.{n}.adaLN_modulation.1.weight": (6 * D, D)})
    assert all(shapes[k] == v for k, v in expected.items())
    layers = ["x_embedder.proj", "t_embedder.mlp.0", "t_embedder.mlp.2", "final_layer.linear",
              "final_layer.adaLN_modulation.1"] + [f"blocks.{n}.{m}" for n in range(2) for m in (
               "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1")]
    names = {f"{layer}.{w}" for layer in layers for w in ("weight", "bias")}
    assert set(shapes) == names | {"pos_embed", "y_embedder.embedding_table.weight"}  # nothing more, nothing less
    assert dit(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 1])).shape == (2, 8, 8, 8)
    # the fixed position embedding: first half encodes the column, second half the row (MAE/DiT layout)
    pe = dit.pos_embed[0]
    assert torch.allclose(pe[1, :D // 4], torch.sin(torch.ones(D // 4) / 10000 ** (torch.arange(D // 4) / (D / 4))))
    assert torch.equal(pe[0, D // 2:], pe[1, D // 2:]) and not torch.equal(pe[0, D // 2:], pe[4, D // 2:])
    with pytest.raises(ValueError, match="square"):
        DiT(input_size=(8, 4), patch_size=2)


def test_patchify_unpatchify_round_trip():
    dit, x = small_dit(), torch.randn(3, 4, 8, 8)
    tokens = rearrange(x, "n c (h p) (w q) -> n (h w) (p q c)", p=2, q=2)
    assert torch.equal(dit.unpatchify(tokens), x)
    # and the patch embedding reads the same patch as token k: perturb one patch, one token moves
    embedded, moved = dit.x_embedder(x), x.clone()
    moved[:, :, 2:4, 4:6] += 1.0  # the patch in row 1, column 2 of the 4x4 grid: token 1 * 4 + 2 = 6
    changed = (dit.x_embedder(moved) - embedded).abs().sum(-1)[0]
    assert changed.nonzero().flatten().tolist() == [6]


def test_adaln_zero_block_starts_as_identity_and_dit_outputs_zero():
    block, x = DiTBlock(64, 4), torch.randn(2, 16, 64)
    torch.nn.init.zeros_(block.adaLN_modulation[-1].weight)
    torch.nn.init.zeros_(block.adaLN_modulation[-1].bias)
    assert torch.equal(block(x, torch.randn(2, 64)), x)
    dit = small_dit()
    assert torch.equal(dit(torch.randn(2, 4, 8, 8), torch.tensor([3, 5]), torch.tensor([0, 1])), torch.zeros(2, 4, 8, 8))


def test_dit_output_depends_on_t_and_y():
    dit, x = randomise_zero_layers(small_dit()).eval(), torch.randn(2, 4, 8, 8)
    out = dit(x, torch.tensor([10, 10]), torch.tensor([0, 0]))
    assert not torch.allclose(out, dit(x, torch.tensor([500, 500]), torch.tensor([0, 0])))
    assert not torch.allclose(out, dit(x, torch.tensor([10, 10]), torch.tensor([1, 1])))
    assert torch.equal(out, dit(x, torch.tensor([10, 10]), torch.tensor([0, 0])))  # eval: no label dropout
    dit.y_embedder.dropout_prob = 1.0  # training with certain dropout: every label becomes "no class"
    null = dit(x, torch.tensor([10, 10]), torch.tensor([3, 3]))
    assert torch.equal(dit.train()(x, torch.tensor([10, 10]), torch.tensor([0, 1])), null)


def test_fused_attention_equals_written_out_softmax():
    attn, x = Attention(64, 4), torch.randn(2, 16, 64)
    q, k, v = rearrange(attn.qkv(x), "n t (three h d) -> three n h t d", three=3, h=4)
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(16), dim=-1)
    manual = attn.proj(rearrange(weights @ v, "n h t d -> n t (h d)"))
    assert torch.allclose(attn(x), manual, atol=1e-5)


# -----------------------------------------------------------------------------
# diffusion


def test_schedule_is_float32_and_q_sample_matches_the_formula():
    diffusion = GaussianDiffusion()
    assert diffusion.betas.dtype == diffusion.alphas_cumprod.dtype == torch.float32
    assert diffusion.betas[0].item() == pytest.approx(1e-4) and diffusion.betas[-1].item() == pytest.approx(0.02)
    x0, noise, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([0, 500, 999])
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[t].float().view(-1, 1, 1, 1)
    assert torch.allclose(diffusion.q_sample(x0, t, noise), abar.sqrt() * x0 + (1 - abar).sqrt() * noise, atol=1e-6)


def test_ddim_timesteps():
    diffusion = GaussianDiffusion()
    for steps in (2, 50, 999, 1000):
        times = diffusion.ddim_timesteps(steps)
        assert len(times) == steps and times[0] == 999 and times[-1] == 0
        assert all(a > b for a, b in zip(times, times[1:]))
    assert diffusion.ddim_timesteps(1) == [999]  # one step: from pure noise straight to x0
    for bad in (0, 1001):
        with pytest.raises(ValueError):
            diffusion.ddim_timesteps(bad)


def test_cfg_scale_one_is_conditional_and_larger_scales_guide_every_channel():
    diffusion, dit = GaussianDiffusion(), randomise_zero_layers(small_dit()).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([300, 300]), torch.tensor([0, 2])
    cond = dit(x, t, y)
    assert torch.equal(diffusion.guided_eps(dit, x, t, y, 1.0, null_label=3), cond)
    uncond = dit(x, t, torch.tensor([3, 3]))
    guided = diffusion.guided_eps(dit, x, t, y, 4.0, null_label=3)
    assert torch.allclose(guided, uncond + 4.0 * (cond - uncond), atol=1e-5)
    assert all(not torch.allclose(guided[:, c], cond[:, c]) for c in range(4))  # all four channels guided


def exact_gaussian_eps(diffusion, mean, std):
    """For data ~ N(mean, std^2) the optimal noise predictor is known in closed form:
    x_t ~ N(sqrt(abar) mean, abar std^2 + 1 - abar) and E[noise | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) mean) / var."""
    def model(x, t, y):
        abar = diffusion.alphas_cumprod[t].view(-1, 1)
        return (1 - abar).sqrt() * (x - abar.sqrt() * mean) / (abar * std ** 2 + 1 - abar)
    return model


@pytest.mark.parametrize("sampler", ["ddpm", "ddim1000", "ddim50_eta1", "ddim50"])
def test_samplers_reach_a_known_gaussian(sampler):
    diffusion, mean, std = GaussianDiffusion(), 0.7, 0.5
    model, g = exact_gaussian_eps(diffusion, mean, std), torch.Generator().manual_seed(0)
    noise, y = torch.randn(20_000, 1, generator=g), torch.zeros(20_000, dtype=torch.long)
    if sampler == "ddpm":
        x = diffusion.ddpm_sample(model, noise, y, generator=g)
    else:
        steps, eta = {"ddim1000": (1000, 0.0), "ddim50_eta1": (50, 1.0), "ddim50": (50, 0.0)}[sampler]
        x = diffusion.ddim_sample(model, noise, y, steps, eta, generator=g)
    assert x.mean().item() == pytest.approx(mean, abs=0.02)
    if sampler in ("ddpm", "ddim1000"):
        assert x.std().item() == pytest.approx(std, rel=0.03)
    else:  # 50 coarse steps plug in the predicted x0 where its posterior spread belongs, and lose a
        assert 0.85 * std < x.std().item() < std  # little variance: within 15 %, never above the target


# -----------------------------------------------------------------------------
# the whole pipeline and sample.py


def test_sample_writes_a_grid_and_is_reproducible(pipeline, tmp_path):
    a, b = str(tmp_path / "a.png"), str(tmp_path / "b.png")
    run("sample.py", "--out_dir", pipeline, "--num_samples", "6", "--steps", "3", "--output", a)
    run("sample.py", "--out_dir", pipeline, "--num_samples", "6", "--steps", "3", "--output", b,
        "--class_label", "1", "--cfg_scale", "2")
    run("sample.py", "--out_dir", pipeline, "--num_samples", "6", "--steps", "3", "--output", b)
    assert open(a, "rb").read() == open(b, "rb").read()


def test_sample_refuses_bad_input(pipeline, tmp_path):
    for args, word in [(["--steps", "0"], "--steps"), (["--steps", "1001"], "--steps"),
                       (["--sampler", "ddpm", "--steps", "10"], "ddim"), (["--cfg_scale", "-1"], "--cfg_scale"),
                       (["--class_label", "3"], "out of range"), (["--num_samples", "0"], "--num_samples")]:
        assert_one_line_error(run("sample.py", "--out_dir", pipeline, *args, check=False), word)
    assert_one_line_error(run("sample.py", "--out_dir", str(tmp_path), check=False), "train_ae.py")
    assert_one_line_error(run("train_prior.py", "--out_dir", str(tmp_path), check=False), "train_ae.py --stage 2")
    assert not os.listdir(tmp_path)


def test_sample_refuses_a_prior_from_another_autoencoder(pipeline, tmp_path):
    import shutil
    out = str(tmp_path)
    shutil.copy(os.path.join(pipeline, "prior.pt"), out)  # a prior trained on the pipeline's latents...
    run("train_ae.py", "--stage", "joint", "--out_dir", out, *TINY_AE, "--z_channels", "8")  # ...another AE
    assert_one_line_error(run("sample.py", "--out_dir", out, check=False), "train_prior.py")
    shutil.copy(os.path.join(pipeline, "prior.pt"), os.path.join(out, "ae.pt"))  # a prior where an AE goes
    assert_one_line_error(run("sample.py", "--out_dir", out, check=False), "'prior'", "'autoencoder'")


def test_unconditional_prior_refuses_guidance(tmp_path, pipeline):
    import shutil
    out = str(tmp_path)
    for name in ("ae.pt", "latents.pt"):
        shutil.copy(os.path.join(pipeline, name), out)
    run("train_prior.py", "--out_dir", out, *TINY_PRIOR, "--unconditional")
    assert_one_line_error(run("sample.py", "--out_dir", out, "--cfg_scale", "3", check=False), "unconditional")
    run("sample.py", "--out_dir", out, "--num_samples", "2", "--steps", "2")
