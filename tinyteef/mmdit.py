"""The SD3 MMDiT at any size: the one denoiser that the toy and SD3, teachers and students share.

Its conditioning vector is Eq. 6 of the paper,

    z_{t,c} = G(psi(t)) + F(c),

with psi the sinusoidal embedding (`psi`), G the timestep MLP and F the pooled-text MLP
(`time_text_embed.timestep_embedder` and `time_text_embed.text_embedder`). `forward` takes an
optional `z` in place of Eq. 6's: a student's z^ (TeEFusion's Eq. 7, DistillCFG's H(psi(w)) and the
G(psi(w)) ablation, all in guidance.Student.z_hat) enters here, so no variant forks the model. z
drives every adaLN modulation.

Parameter names equal those of diffusers' `SD3Transformer2DModel`, so its state dicts (SD3-medium,
SD3.5 with qk-norm and MMDiT-X dual attention, and the authors' released TeEFusion student) load
with `load_state_dict(strict=True)` and no mapping code.

References: Esser et al. 2024 (SD3, Fig. 2 the MMDiT block); Peebles & Xie 2023 (DiT, adaLN-zero);
SD3.5 (qk RMSNorm; MMDiT-X extra image self-attention).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F_  # F is the paper's pooled-text MLP; keep the name free
from torch.utils.checkpoint import checkpoint

TIME_SCALE = 1000.0  # SD3 feeds the network 1000 * t; TeEFusion scales w the same way (authors' code)
PSI_DIM = 256  # width of the sinusoidal embedding psi in SD3
W_ROUNDINGS = ("float32", "authors-bf16")  # how 1000 w is built before psi (psi_input)


@dataclass
class MMDiTConfig:
    """Sizes of an MMDiT; field names are diffusers' config keys. Defaults: SD3-medium."""

    sample_size: int = 128  # latent side the position table was made for (sets its grid spacing)
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    num_layers: int = 24
    attention_head_dim: int = 64
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096  # width of the text token embeddings
    caption_projection_dim: int = 1536  # must equal the hidden size heads * head_dim
    pooled_projection_dim: int = 2048  # width of the pooled text vector
    pos_embed_max_size: int = 192  # side of the stored position table, cropped to the input
    qk_norm: str | None = None  # None (SD3) or "rms_norm" (SD3.5)
    dual_attention_layers: tuple = ()  # blocks with MMDiT-X's extra image self-attention (SD3.5-M)

    @property
    def hidden_size(self):
        return self.num_attention_heads * self.attention_head_dim

    def __post_init__(self):
        self.dual_attention_layers = tuple(self.dual_attention_layers)
        if self.caption_projection_dim != self.hidden_size:
            raise ValueError(
                f"caption_projection_dim ({self.caption_projection_dim}) must equal "
                f"num_attention_heads * attention_head_dim ({self.hidden_size})")
        if self.qk_norm not in (None, "rms_norm"):
            raise ValueError(f"qk_norm must be None or 'rms_norm', got {self.qk_norm!r}")


def psi(s, dim=PSI_DIM):
    """The sinusoidal embedding psi of Eq. 6-7, as SD3 computes it, in float32.

    psi(s) = [cos(s f_0), ..., cos(s f_{d/2-1}), sin(s f_0), ..., sin(s f_{d/2-1})],
    f_i = 10000^(-i / (d/2)). s is 1000 t for the time and 1000 w for TeEFusion's guidance.
    Always float32: in bf16, 1000 * 6 would round to 6016. s: (B,) -> (B, dim).
    """
    half = dim // 2
    f = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=s.device) / half)
    angle = s.float()[:, None] * f[None]  # (B, half)
    return torch.cat([torch.cos(angle), torch.sin(angle)], dim=-1)


def psi_input(s, device, rounding="float32"):
    """The value entering psi: 1000 s as a float32 (B or 1,) tensor, for s a number or a (B,) tensor.
    rounding: "float32" (ours; always for the time t) or, for a guidance weight w, "authors-bf16"."""
    if rounding not in W_ROUNDINGS:
        raise ValueError(f"unknown w rounding {rounding!r}; choose one of {', '.join(W_ROUNDINGS)}")
    if rounding == "authors-bf16":
        # As the authors' pipeline builds it, torch.tensor((w,), dtype=bf16) * 1000. (AIDC-AI/TeEFusion,
        # pipelines/sd3_teefusion_pipeline.py), the value their released student runs and likely was trained on.
        # bf16 keeps 8 significant bits: 1000 w lands on a multiple of 32 in [4096, 8192) (of 64 up to 16384):
        # w = 5, 6, 12 enter psi as 4992, 6016, 12032. psi's sinusoid stays float32, as in their time_proj.
        return (torch.as_tensor(s, dtype=torch.bfloat16, device=device).reshape(-1) * TIME_SCALE).float()
    return torch.as_tensor(s, dtype=torch.float32, device=device).reshape(-1) * TIME_SCALE


def psi_scaled(s, weight, rounding="float32"):
    """psi(1000 s), s = t or w (a number or (B,)): 1000 s as `psi_input` builds it, the sinusoid in
    float32, cast to the dtype of the MLP `weight` that reads it. (B or 1, PSI_DIM)."""
    return psi(psi_input(s, weight.device, rounding)).to(weight.dtype)


def sincos_pos_table(P, D, base_size):
    """SD3's fixed 2-D sin-cos position table for a P x P patch grid, (P * P, D) in float32.

    Grid coordinates are arange(P) / (P / base_size); the first D/2 channels encode the column,
    the last D/2 the row, each as [sin | cos](pos * 10000^(-k / (D/4))), computed in float64.
    """
    pos = torch.arange(P, dtype=torch.float64) / (P / base_size)  # (P,)
    omega = 1.0 / 10000 ** (torch.arange(D // 4, dtype=torch.float64) / (D / 4))  # (D/4,)
    angle = pos[:, None] * omega[None]  # (P, D/4)
    emb = torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1)  # (P, D/2)
    col = emb[None, :, :].expand(P, P, D // 2)  # (row, col, D/2): the column's code
    row = emb[:, None, :].expand(P, P, D // 2)
    return torch.cat([col, row], dim=-1).reshape(P * P, D).float()


def layer_norm(x):
    """LayerNorm over channels without learned affine (eps 1e-6): adaLN supplies scale and shift."""
    return F_.layer_norm(x, x.shape[-1:], eps=1e-6)


def modulate(x, shift, scale):
    """adaLN: x * (1 + scale) + shift, per sample. x (B, L, D); shift, scale (B, D)."""
    return x * (1 + scale[:, None]) + shift[:, None]


class MLPEmbedder(nn.Module):
    """Linear - SiLU - Linear: G (timestep MLP), F (pooled-text MLP) and DistillCFG's H."""

    def __init__(self, in_dim, dim):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F_.silu(self.linear_1(x)))


class TimeTextEmbed(nn.Module):
    """Holds G and F of Eq. 6 under diffusers' names."""

    def __init__(self, dim, pooled_dim):
        super().__init__()
        self.timestep_embedder = MLPEmbedder(PSI_DIM, dim)  # G
        self.text_embedder = MLPEmbedder(pooled_dim, dim)  # F


class PatchEmbed(nn.Module):
    """p x p patches -> tokens, plus the centre crop of the stored position table."""

    def __init__(self, cfg):
        super().__init__()
        D, p, P = cfg.hidden_size, cfg.patch_size, cfg.pos_embed_max_size
        self.patch_size, self.max_size = p, P
        self.proj = nn.Conv2d(cfg.in_channels, D, kernel_size=p, stride=p)
        # A buffer, stored in SD3 checkpoints (diffusers and the original layout both keep it).
        self.register_buffer("pos_embed", sincos_pos_table(P, D, cfg.sample_size // p)[None])

    def forward(self, x):  # x (B, C, H, W)
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        if h > self.max_size or w > self.max_size:
            raise ValueError(f"input of {h}x{w} patches exceeds the position table "
                             f"({self.max_size}x{self.max_size}); use a smaller image")
        top, left = (self.max_size - h) // 2, (self.max_size - w) // 2
        pos = self.pos_embed.view(1, self.max_size, self.max_size, -1)[:, top:top + h, left:left + w]
        tokens = self.proj(x).flatten(2).transpose(1, 2)  # (B, h*w, D), channels-first in memory
        # Made contiguous once here: the residual stream keeps the memory layout of its first tensor,
        # and a channels-first stream costs a copy before every LayerNorm and slower elementwise
        # kernels in every block (measured: 0.87x of diffusers' speed at batch 4 on an H100).
        return (tokens + pos.reshape(1, h * w, -1).to(tokens.dtype)).contiguous()


class GELUProj(nn.Module):
    """Linear then tanh-GELU; a module of its own so the key reads `net.0.proj` as in diffusers."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.proj = nn.Linear(dim, hidden)

    def forward(self, x):
        return F_.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """Linear(D, 4D) - GELU(tanh) - Linear(4D, D). `net.1` stands where diffusers has a dropout,
    so that the keys `net.0.proj` and `net.2` match."""

    def __init__(self, dim):
        super().__init__()
        self.net = nn.Sequential(GELUProj(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        return self.net(x)


class AdaLinear(nn.Module):
    """The modulation projection of an adaptive norm: z -> n chunks, Linear(SiLU(z))."""

    def __init__(self, dim, n):
        super().__init__()
        self.n = n
        self.linear = nn.Linear(dim, n * dim)

    def forward(self, z):  # z (B, D) -> n tensors (B, D)
        return self.linear(F_.silu(z)).chunk(self.n, dim=-1)


class Attention(nn.Module):
    """Multi-head attention with SD3's names. With `context` (joint attention) the text tokens get
    their own projections (add_*), and image and text attend together over [image, text]."""

    def __init__(self, dim, heads, qk_norm, joint, context_out):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        head_dim = dim // heads
        rms = (lambda: nn.RMSNorm(head_dim, eps=1e-6)) if qk_norm else (lambda: None)
        self.norm_q, self.norm_k = rms(), rms()
        if joint:
            self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(dim, dim) for _ in range(3))
            self.norm_added_q, self.norm_added_k = rms(), rms()
            # The last block computes the text stream's attention output but never uses it.
            self.to_add_out = nn.Linear(dim, dim) if context_out else None

    def _heads(self, x, proj, norm):  # (B, L, D) -> (B, H, L, D/H)
        B, L, _ = x.shape
        y = proj(x).view(B, L, self.heads, -1).transpose(1, 2)
        return norm(y) if norm is not None else y

    def forward(self, x, context=None):  # x (B, N, D), context (B, L, D) or None
        q, k, v = (self._heads(x, p, n) for p, n in
                   ((self.to_q, self.norm_q), (self.to_k, self.norm_k), (self.to_v, None)))
        if context is not None:
            q = torch.cat([q, self._heads(context, self.add_q_proj, self.norm_added_q)], dim=2)
            k = torch.cat([k, self._heads(context, self.add_k_proj, self.norm_added_k)], dim=2)
            v = torch.cat([v, self._heads(context, self.add_v_proj, None)], dim=2)
        o = F_.scaled_dot_product_attention(q, k, v)  # (B, H, N + L, D/H), scale 1/sqrt(D/H)
        o = o.transpose(1, 2).flatten(2)  # (B, N + L, D)
        N = x.shape[1]
        x_out = self.to_out[0](o[:, :N])
        if context is None:
            return x_out
        c_out = self.to_add_out(o[:, N:]) if self.to_add_out is not None else None
        return x_out, c_out


class JointBlock(nn.Module):
    """One MMDiT block (SD3 Fig. 2): two streams (image x, text c) with their own weights, one joint
    attention, adaLN-zero modulation of both streams from z. The last block is `context_pre_only`:
    the text stream only supplies keys and values, and is modulated by a plain adaptive norm."""

    def __init__(self, dim, heads, qk_norm=None, context_pre_only=False, dual_attention=False):
        super().__init__()
        self.context_pre_only, self.dual_attention = context_pre_only, dual_attention
        # shift, scale, gate for attention and MLP (+ shift, scale, gate of attn2 in MMDiT-X)
        self.norm1 = AdaLinear(dim, 9 if dual_attention else 6)
        # last block: diffusers' AdaLayerNormContinuous, chunk order (scale, shift)
        self.norm1_context = AdaLinear(dim, 2 if context_pre_only else 6)
        self.attn = Attention(dim, heads, qk_norm, joint=True, context_out=not context_pre_only)
        self.attn2 = Attention(dim, heads, qk_norm, joint=False, context_out=False) if dual_attention else None
        self.ff = FeedForward(dim)
        self.ff_context = None if context_pre_only else FeedForward(dim)

    def forward(self, x, c, z):  # x (B, N, D), c (B, L, D), z (B, D)
        mod = self.norm1(z)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod[:6]
        if self.context_pre_only:
            c_scale, c_shift = self.norm1_context(z)
            c_in = modulate(layer_norm(c), c_shift, c_scale)
        else:
            c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(z)
            c_in = modulate(layer_norm(c), c_shift_msa, c_scale_msa)
        x_norm = layer_norm(x)
        x_attn, c_attn = self.attn(modulate(x_norm, shift_msa, scale_msa), c_in)
        x = x + gate_msa[:, None] * x_attn
        if self.dual_attention:  # MMDiT-X: image-only self-attention on the same normalised x
            shift_msa2, scale_msa2, gate_msa2 = mod[6:]
            x = x + gate_msa2[:, None] * self.attn2(modulate(x_norm, shift_msa2, scale_msa2))
        x = x + gate_mlp[:, None] * self.ff(modulate(layer_norm(x), shift_mlp, scale_mlp))
        if self.context_pre_only:
            return x, None
        c = c + c_gate_msa[:, None] * c_attn
        c = c + c_gate_mlp[:, None] * self.ff_context(modulate(layer_norm(c), c_shift_mlp, c_scale_mlp))
        return x, c


class MMDiT(nn.Module):
    """v_theta(x_t, t, c) of SD3 (and of our toy, at small size).

    forward(x (B, C, H, W), t (B,) in [0, 1], tokens (B, L, joint_attention_dim),
            pooled (B, pooled_projection_dim), z (B, D) or None) -> velocity (B, C, H, W).
    z is the conditioning vector that drives every adaLN: Eq. 6's G(psi(t)) + F(c) unless given (a
    student passes its Eq. 7 z^, guidance.Student.z_hat).
    """

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        self.config = cfg
        D = cfg.hidden_size
        self.pos_embed = PatchEmbed(cfg)
        self.time_text_embed = TimeTextEmbed(D, cfg.pooled_projection_dim)
        self.context_embedder = nn.Linear(cfg.joint_attention_dim, D)
        self.transformer_blocks = nn.ModuleList([
            JointBlock(D, cfg.num_attention_heads, cfg.qk_norm, context_pre_only=i == cfg.num_layers - 1,
                       dual_attention=i in cfg.dual_attention_layers)
            for i in range(cfg.num_layers)])
        self.norm_out = AdaLinear(D, 2)  # diffusers' AdaLayerNormContinuous: (scale, shift)
        self.proj_out = nn.Linear(D, cfg.patch_size ** 2 * cfg.out_channels)
        self.gradient_checkpointing = False
        self.initialize_weights()

    def initialize_weights(self):
        """DiT's initialisation: Xavier-uniform linears, and adaLN-zero: every modulation and the
        output projection start at zero, so each block starts as the identity. (Real SD3 weights
        overwrite all of this when loaded.)"""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.pos_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for m in self.modules():
            if isinstance(m, AdaLinear):
                nn.init.zeros_(m.linear.weight)
        nn.init.zeros_(self.proj_out.weight)

    @property
    def G(self):
        """The timestep MLP G of Eq. 6-7."""
        return self.time_text_embed.timestep_embedder

    @property
    def F(self):
        """The pooled-text MLP F of Eq. 6-7."""
        return self.time_text_embed.text_embedder

    def psi(self, s, rounding="float32"):
        """psi(1000 s) for G's input, s = t or w (the authors scale w by 1000 exactly like t):
        float32 sinusoid, cast to G's dtype; `rounding` for w only (psi_input). (B or 1, PSI_DIM)."""
        return psi_scaled(s, self.G.linear_1.weight, rounding)

    def conditioning(self, t, pooled):
        """Eq. 6: z_{t,c} = G(psi(t)) + F(c), c the pooled text vector. (B, D)."""
        return self.G(self.psi(t)) + self.F(pooled)

    def forward(self, x, t, tokens, pooled, z=None):
        B, _, H, W = x.shape
        p = self.config.patch_size
        if H % p or W % p:
            raise ValueError(f"latent height and width ({H}x{W}) must be multiples of the patch size {p}")
        if z is None:
            t = torch.as_tensor(t, device=x.device).float().reshape(-1).expand(B)
            z = self.conditioning(t, pooled)  # (B, D), Eq. 6
        xs = self.pos_embed(x)  # (B, N, D), N = H W / p^2
        c = self.context_embedder(tokens)  # (B, L, D)
        for block in self.transformer_blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                xs, c = checkpoint(block, xs, c, z, use_reentrant=False)
            else:
                xs, c = block(xs, c, z)
        scale, shift = self.norm_out(z)
        xs = self.proj_out(modulate(layer_norm(xs), shift, scale))  # (B, N, p*p*C)
        # unpatchify: (B, h, w, p, p, C) -> (B, C, h*p, w*p)
        xs = xs.view(B, H // p, W // p, p, p, self.config.out_channels)
        return torch.einsum("nhwpqc->nchpwq", xs).reshape(B, self.config.out_channels, H, W)

    def compile_blocks(self):
        """Compile each transformer block in place (`nn.Module.compile`): fused kernels replace the
        unfused elementwise ones (adaLN modulate, gates, residual adds, GELU, LayerNorm). The first
        calls are slow while they compile. Returns self.

        Regional, not `torch.compile(model)`: the blocks share one compiled `JointBlock.forward`,
        `forward` still checkpoints each block, and the state_dict keys stay unchanged (no
        `_orig_mod.`), so checkpoints and the diffusers export are unaffected. Static shapes: one
        compiled entry per block kind, batch size, grad mode and kind of weights, over all models;
        train_sd3.py with previews needs 12 on the tiny SD3, past dynamo's default limit of 8 (beyond
        which the rest would run eagerly), hence the raised limit."""
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        for block in self.transformer_blocks:
            block.compile(dynamic=False)
        return self

    def flops_per_forward(self, batch, height, width, text_len):
        """Matmul and convolution FLOPs of one forward pass (2 per multiply-add), as nanoGPT's
        `estimate_mfu` counts them; a training step costs about 3x (forward + backward).
        height, width: latent size; text_len: number of text tokens L."""
        cfg, D = self.config, self.config.hidden_size
        p = cfg.patch_size
        N, L = (height // p) * (width // p), text_len
        f = 2 * N * D * cfg.in_channels * p * p  # patch embedding
        f += 2 * (PSI_DIM * D + D * D) + 2 * (cfg.pooled_projection_dim * D + D * D)  # G, F
        f += 2 * L * cfg.joint_attention_dim * D  # context embedder
        for i, blk in enumerate(self.transformer_blocks):
            last = blk.context_pre_only
            f += 2 * D * D * (9 if blk.dual_attention else 6) + 2 * D * D * (2 if last else 6)  # adaLN
            f += 2 * N * D * D * 4 + 2 * L * D * D * (3 if last else 4)  # q, k, v, out projections
            f += 2 * 2 * (N + L) ** 2 * D  # q k^T and attention @ v
            f += 2 * N * D * 4 * D * 2 + (0 if last else 2 * L * D * 4 * D * 2)  # feed-forwards
            if blk.dual_attention:
                f += 2 * N * D * D * 4 + 2 * 2 * N * N * D
        f += 2 * D * 2 * D + 2 * N * D * p * p * cfg.out_channels  # final norm and projection
        return batch * f
