"""
The networks and the diffusion process, in three parts:
  1. the autoencoder: a VQGAN / latent-diffusion style KL autoencoder whose decoder can be weakened
     by a width multiplier and by dropout, the two knobs the Decoupled Autoencoder (DAE) needs;
  2. the prior: a Diffusion Transformer (DiT, Peebles & Xie 2023) written out in full, with the
     original's parameter names and shapes, so its checkpoints load unchanged;
  3. GaussianDiffusion: the noise schedule, the training loss and the DDIM / DDPM sampler.
"""
import math
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from plumbing import TanhGELU, attention  # the same functions, faster: "performance, not method"

# -----------------------------------------------------------------------------
# 1. the autoencoder


def Normalize(channels):
    # GroupNorm with up to 32 groups; gcd keeps any channel count legal for thin (weak) decoders
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """norm -> SiLU -> conv, twice, plus a skip (1x1 conv when the width changes)."""

    def __init__(self, in_ch, out_ch, dropout=0.0):
        super().__init__()
        self.norm1 = Normalize(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = Normalize(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.dropout = nn.Dropout(dropout)  # the DAE's second way to weaken a decoder
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Encoder(nn.Module):
    """(N, C, H, W) image -> (N, 2 z_channels, H / 2^(L-1), W / 2^(L-1)): mean, log-variance."""

    def __init__(self, in_channels=1, ch=16, ch_mult=(1, 2, 4), num_res_blocks=1, z_channels=4,
                 dropout=0.0):
        super().__init__()
        layers = [nn.Conv2d(in_channels, ch, 3, padding=1)]
        width = ch
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                layers.append(ResnetBlock(width, ch * mult, dropout))
                width = ch * mult
            if level != len(ch_mult) - 1:  # halve the resolution between levels
                layers.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
        # the middle: taming adds self-attention here; at 8x8 the convs already see the whole image
        layers += [ResnetBlock(width, width, dropout), Normalize(width), nn.SiLU()]
        layers.append(nn.Conv2d(width, 2 * z_channels, 3, padding=1))  # double_z: mean, log-var
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


class Decoder(nn.Module):
    """(N, z_channels, h, w) latent -> (N, C, H, W) image, the Encoder's mirror. `width` scales
    every channel count: width=0.25 is a decoder with ~1/16 of the parameters."""

    def __init__(self, out_channels=1, ch=16, ch_mult=(1, 2, 4), num_res_blocks=1, z_channels=4,
                 dropout=0.0, width=1.0):
        super().__init__()
        chans = [max(1, round(ch * m * width)) for m in ch_mult]  # every width its own class
        width = chans[-1]
        layers = [nn.Conv2d(z_channels, width, 3, padding=1), ResnetBlock(width, width, dropout)]
        for level in reversed(range(len(ch_mult))):
            for _ in range(num_res_blocks + 1):  # one block more than the encoder, as in taming
                layers.append(ResnetBlock(width, chans[level], dropout))
                width = chans[level]
            if level != 0:  # nearest-neighbour upsampling followed by a conv, as in taming
                layers.append(nn.Upsample(scale_factor=2.0, mode="nearest"))
                layers.append(nn.Conv2d(width, width, 3, padding=1))
        layers += [Normalize(chans[0]), nn.SiLU()]
        layers.append(nn.Conv2d(chans[0], out_channels, 3, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, z):
        return self.layers(z)


class Autoencoder(nn.Module):
    """Encoder -> 1x1 conv -> diagonal Gaussian posterior q(z|x) -> 1x1 conv -> Decoder.
    Like the latent-diffusion "AutoencoderKL": the encoder predicts a mean and a log-variance per
    latent element; training decodes a sample z = mean + std * noise and adds a small
    KL(q(z|x) || N(0, I)), which keeps the latent bounded and smooth: what the prior models."""

    def __init__(self, img_channels=1, ch=16, ch_mult=(1, 2, 4), num_res_blocks=1, z_channels=4,
                 dropout=0.0, dec_width=1.0, dec_dropout=0.0):
        super().__init__()
        self.encoder = Encoder(img_channels, ch, ch_mult, num_res_blocks, z_channels, dropout)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * z_channels, 1)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, 1)
        self.decoder = Decoder(img_channels, ch, ch_mult, num_res_blocks, z_channels, dec_dropout,
                               dec_width)
        self.encoder_frozen = False

    def freeze_encoder(self):
        """DAE stage 2: the latent must not change. No gradient reaches the encoder, and it stays in
        eval mode (no dropout noise in the latent) even when the training loop calls train()."""
        self.encoder_frozen = True
        self.encoder.requires_grad_(False)
        self.quant_conv.requires_grad_(False)
        return self.train(self.training)

    def train(self, mode=True):
        super().train(mode)
        # quant_conv, a 1x1 conv, has no dropout: only the encoder needs to stay in eval mode
        self.encoder.train(mode and not self.encoder_frozen)
        return self

    def encode(self, x):
        """Returns the posterior's mean and standard deviation, each (N, z_channels, h, w)."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x, latent_noise=0.0, pool=1):
        """Reconstruct x through a posterior sample; also return the KL per latent element. With
        latent_noise s the decoder reads the sample plus noise of s times the latent's spread; with
        pool 2, the sample average-pooled to half its size (its target: the image pooled alike)."""
        mean, std = self.encode(x)
        z = mean + std * torch.randn_like(std)
        if latent_noise > 0:  # relative to the latent's own scale: the encoder cannot outgrow it
            z = z + latent_noise * z.detach().std() * torch.randn_like(z)
        kl = 0.5 * (mean ** 2 + std ** 2 - 1.0 - 2.0 * torch.log(std)).mean()
        return self.decode(F.avg_pool2d(z, pool)), kl


# -----------------------------------------------------------------------------
# 2. the prior: a Diffusion Transformer. Names and shapes of every parameter follow the original
# DiT code (facebookresearch/DiT, models.py), so `load_state_dict(original, strict=True)` works.


def modulate(x, shift, scale):
    # adaptive LayerNorm: the conditioning shifts and scales the normalised tokens, per sample
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """Integer diffusion step t -> sinusoidal features (like the Transformer's positions) -> MLP."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        # cos on the first half, sin on the second, at frequencies from 1 down to 1 / max_period
        half = dim // 2
        steps = torch.arange(half, dtype=torch.float32, device=t.device) / half
        freqs = torch.exp(-math.log(max_period) * steps)
        args = t[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, dim) for even dim

    def forward(self, t):
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size))


class LabelEmbedder(nn.Module):
    """Class label -> vector. Row `num_classes` is the "no class" embedding that classifier-free
    guidance needs (an unconditional model has only it); training swaps a label for it with
    probability dropout_prob."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        has_null_row = dropout_prob > 0 or num_classes == 0
        self.embedding_table = nn.Embedding(num_classes + int(has_null_row), hidden_size)
        self.num_classes, self.dropout_prob = num_classes, dropout_prob

    def forward(self, labels, train):
        if train and self.dropout_prob > 0:  # the original's token_drop
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)


class Attention(nn.Module):
    """Multi-head self-attention, fused: on a GPU the (T, T) matrix is never built."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        qkv = rearrange(self.qkv(x), "n t (three h d) -> three n h t d", three=3, h=self.num_heads)
        x = attention(*qkv)  # F.scaled_dot_product_attention: (N, heads, T, head_dim)
        return self.proj(rearrange(x, "n h t d -> n t (h d)"))


class DiTBlock(nn.Module):
    """A Transformer block whose LayerNorms are modulated by the conditioning c (adaLN-Zero): c
    gives a shift, a scale and a gate for each of the two branches."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        hidden = int(hidden_size * mlp_ratio)
        # named layers keep the original's keys mlp.fc1 and mlp.fc2
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(hidden_size, hidden), act=TanhGELU(),
                                             fc2=nn.Linear(hidden, hidden_size)))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):
        modulation = self.adaLN_modulation(c).chunk(6, dim=1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x                                                                  # (N, T, D)


class FinalLayer(nn.Module):
    """Modulated LayerNorm, then a linear map from each token to its patch of output pixels."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class PatchEmbed(nn.Module):
    """Cut the latent into p x p patches, each embedded by one linear map: a conv of stride p."""

    def __init__(self, patch_size, in_channels, hidden_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)

    def forward(self, x):
        return rearrange(self.proj(x), "n d h w -> n (h w) d")  # row-major tokens


def get_2d_sincos_pos_embed(embed_dim, grid_size):
    """Fixed 2-D position embedding, (grid_size ** 2, embed_dim): the first half of the features
    encodes the column of the patch, the second half its row, each as sin then cos (MAE, DiT)."""
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 4, dtype=torch.float64) / (embed_dim / 4))
    axis = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(axis, axis, indexing="ij")
    angles = [position.reshape(-1, 1) * omega for position in (cols, rows)]  # (T, embed_dim / 4)
    return torch.cat([torch.cat([a.sin(), a.cos()], dim=1) for a in angles], dim=1).float()


class DiT(nn.Module):
    """Diffusion Transformer: noisy latent x (N, C, H, W), step t (N,), label y (N,) -> predicted
    noise. With learn_sigma the output has 2C channels (noise, then the original's variance); we
    read the first C."""

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28,
                 num_heads=16, mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000,
                 learn_sigma=True):
        super().__init__()
        if not isinstance(input_size, int) or input_size % patch_size:
            raise ValueError(f"DiT needs a square latent whose side ({input_size}) "
                             f"--patch_size {patch_size} divides")
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = (input_size // patch_size) ** 2
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio)
                                     for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        grid = int(self.pos_embed.shape[1] ** 0.5)
        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid)
        self.pos_embed.data.copy_(pos_embed.unsqueeze(0))
        w = self.x_embedder.proj.weight.data  # initialise the patch conv like a linear layer
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: zero modulation makes every gate 0, so each block starts as the identity
        # function and the network as a whole starts by predicting 0 (the output layer is zero too)
        zeroed = [block.adaLN_modulation[-1] for block in self.blocks]
        zeroed += [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for layer in zeroed:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x):
        """(N, T, p * p * C) tokens -> (N, C, H, W); T = (H / p) * (W / p) in row-major order."""
        side = int(x.shape[1] ** 0.5)
        p = self.patch_size
        return rearrange(x, "n (h w) (p q c) -> n c (h p) (w q)", h=side, p=p, q=p)

    def forward(self, x, t, y):
        x = self.x_embedder(x) + self.pos_embed                      # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y, self.training)   # (N, D)
        for block in self.blocks:
            x = block(x, c)                                          # (N, T, D)
        return self.unpatchify(self.final_layer(x, c))               # (N, out_channels, H, W)


# -----------------------------------------------------------------------------
# 3. Gaussian diffusion (Ho et al. 2020, DDPM; Song et al. 2021, DDIM) on the latents


class GaussianDiffusion(nn.Module):
    """The forward process q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I), with beta_t linear
    from 1e-4 to 0.02 over 1000 steps, alpha_t = 1 - beta_t, abar_t = prod_{s<=t} alpha_s: computed
    in float64, kept in a float32 buffer (float64 breaks Apple's MPS). `model` below is any
    callable model(x, t, y) -> predicted noise (channels beyond x's are ignored)."""

    def __init__(self, num_timesteps=1000, beta_start=1e-4, beta_end=0.02):
        super().__init__()
        self.num_timesteps = num_timesteps
        betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
        self.register_buffer("alphas_cumprod", torch.cumprod(1.0 - betas, dim=0).float())

    def q_sample(self, x0, t, noise):
        """Jump straight to step t: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        abar = self.alphas_cumprod[t].view(-1, *[1] * (x0.dim() - 1))
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def training_loss(self, model, x0, y, t, noise):
        """DDPM Algorithm 1: with t ~ Uniform{0..T-1} and noise ~ N(0, I) drawn per example by the
        caller, noise x0 to x_t and regress the noise (the "simple" loss)."""
        eps = model(self.q_sample(x0, t, noise), t, y)[:, :x0.shape[1]]
        return F.mse_loss(eps.float(), noise)

    def guided_eps(self, model, x, t, y, cfg_scale, null_label, guide=None):
        """Classifier-free guidance in one place, on every channel, in float32:
            eps = eps(x | none) + s (eps(x | y) - eps(x | none));
        s = 1 is the conditional model alone (one pass). With a `guide` model (autoguidance, Karras
        et al. 2024) its conditional prediction, a weaker one, takes the place of eps(x | none)."""
        channels = x.shape[1]
        if cfg_scale == 1.0:
            return model(x, t, y)[:, :channels].float()
        if guide is not None:
            weak = guide(x, t, y)[:, :channels].float()
            return weak + cfg_scale * (model(x, t, y)[:, :channels].float() - weak)
        null = torch.full_like(y, null_label)
        both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
        cond, uncond = both[:, :channels].float().chunk(2)
        return uncond + cfg_scale * (cond - uncond)

    def ddim_timesteps(self, steps):
        """`steps` (1 to T) evenly spaced steps from T-1 down to 0, e.g. 50 of the 1000."""
        return torch.linspace(self.num_timesteps - 1, 0, steps).round().long().tolist()

    @torch.no_grad()
    def ddim_sample(self, model, noise, y, steps=50, eta=0.0, cfg_scale=1.0, null_label=0,
                    generator=None, guide_below=1000, guide=None):
        """DDIM (Song et al. 2021): the same trained model on a sub-sequence of `steps` of the T
        steps. From x_t it predicts x_0, then jumps to the next kept step t' with q(x_t' | x_0):
            x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)
            x_t' = sqrt(abar_t') x_0 + sqrt(1 - abar_t' - sigma^2) eps + sigma z,
            sigma = eta sqrt((1 - abar_t') / (1 - abar_t)) sqrt(1 - abar_t / abar_t').
        eta = 0 is deterministic. eta = 1 with all T steps is DDPM's ancestral sampler (Ho et al.
        2020, Algorithm 2): sigma^2 is then the variance of q(x_{t-1} | x_t, x_0), and the mean is
        that posterior's mean, written through x_0 (`sample.py --sampler ddpm` runs it)."""
        x = noise
        times = self.ddim_timesteps(steps)
        for i, step in enumerate(times):
            t = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
            scale = cfg_scale if step < guide_below else 1.0
            eps = self.guided_eps(model, x, t, y, scale, null_label, guide)
            abar = self.alphas_cumprod[step]
            last = i + 1 == len(times)
            abar_next = torch.ones_like(abar) if last else self.alphas_cumprod[times[i + 1]]
            x0 = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
            sigma = eta * ((1 - abar_next) / (1 - abar) * (1 - abar / abar_next)).sqrt()
            x = abar_next.sqrt() * x0 + (1 - abar_next - sigma ** 2).sqrt() * eps
            if eta > 0 and not last:
                x = x + sigma * torch.randn(x.shape, generator=generator, device=x.device)
        return x
