"""The T5 v1.1 encoder: SD3's text_encoder_3 (T5-XXL, 4.7B parameters in the encoder).

Per layer, with RMS the T5 RMSNorm:

    x += o(Attention(RMS x)),   scores = q k^T + relative position bias  (no 1/sqrt(d) scale)
    x += wo(gelu_tanh(wi_0 h) * wi_1 h),   h = RMS x

then a final RMS. The position bias is an Embedding(buckets, heads) that only block 0 holds; it
is evaluated once and shared by every layer. No biases, no dropout, no embedding scale.

Parameter names equal those of transformers' `T5EncoderModel`, whose state dicts (and SD3's
diffusers-layout text_encoder_3/ files) load with `load_state_dict(strict=True)`.
fp16: transformers clamps activations to +-(65504 - 1000) after each sublayer and keeps `wo` in
fp32; we run fp32 or bf16 and leave both out, so do not run this module in fp16.

Reference: Raffel et al. 2020 (T5); Shazeer 2020 (GEGLU, T5 v1.1); transformers' modeling_t5.py.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class T5Config:
    """Sizes of a T5 encoder; field names are transformers' config.json keys. Defaults: T5 v1.1 XXL."""

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"

    def __post_init__(self):
        if self.feed_forward_proj != "gated-gelu":
            raise ValueError(f"only T5 v1.1's feed_forward_proj 'gated-gelu' is implemented, "
                             f"got {self.feed_forward_proj!r}")


def relative_position_bucket(rel, num_buckets=32, max_distance=128):
    """T5's bidirectional bucket of rel = key - query (an integer tensor), as Mesh TensorFlow and
    transformers compute it. Half the buckets for rel > 0; within each half, |rel| < n/4 gets its
    own bucket, larger |rel| a logarithmic one up to max_distance, beyond which all share the last:
    bucket = n/2 [rel > 0] + (|rel| if |rel| < n/4 else
             min(n/2 - 1, n/4 + int(log(|rel| / (n/4)) / log(max_distance / (n/4)) * n/4))).
    """
    half = num_buckets // 2
    exact = half // 2
    bucket = (rel > 0).long() * half
    n = rel.abs()
    # float32 log, then truncation toward zero, exactly as transformers (the bucket edges depend on it)
    log_bucket = exact + (torch.log(n.float() / exact) / math.log(max_distance / exact)
                          * (half - exact)).long()
    log_bucket = log_bucket.clamp(max=half - 1)
    return bucket + torch.where(n < exact, n, log_bucket)


class T5RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight: no mean subtraction, no bias; the variance in fp32."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        var = x.float().pow(2).mean(-1, keepdim=True)  # (..., 1)
        return self.weight * (x * torch.rsqrt(var + self.eps)).to(self.weight.dtype)


class T5Attention(nn.Module):
    """Self-attention without the 1/sqrt(d) scale (T5 folds it into the initialisation);
    block 0 also holds the relative position bias table."""

    def __init__(self, cfg, has_bias_table):
        super().__init__()
        self.cfg, self.heads = cfg, cfg.num_heads
        inner = cfg.num_heads * cfg.d_kv
        self.q, self.k, self.v = (nn.Linear(cfg.d_model, inner, bias=False) for _ in range(3))
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        if has_bias_table:
            self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)

    def position_bias(self, L, device):
        """The bias of every (query, key) pair, fp32: (1, H, L, L)."""
        pos = torch.arange(L, device=device)
        rel = pos[None, :] - pos[:, None]  # (L, L): key - query
        bucket = relative_position_bucket(rel, self.cfg.relative_attention_num_buckets,
                                          self.cfg.relative_attention_max_distance)
        return self.relative_attention_bias(bucket).float().permute(2, 0, 1)[None]

    def forward(self, x, bias):  # x (B, L, D); bias (B or 1, H, L, L) fp32, mask included
        B, L, _ = x.shape
        q, k, v = (p(x).view(B, L, self.heads, -1).transpose(1, 2)  # (B, H, L, d_kv)
                   for p in (self.q, self.k, self.v))
        scores = (q @ k.transpose(-1, -2)).float() + bias  # (B, H, L, L)
        attn = scores.softmax(dim=-1).to(v.dtype)  # softmax in fp32 even in bf16
        return self.o((attn @ v).transpose(1, 2).reshape(B, L, -1))


class T5SelfAttentionLayer(nn.Module):
    """x + Attention(RMS x), as transformers' layer.0."""

    def __init__(self, cfg, has_bias_table):
        super().__init__()
        self.SelfAttention = T5Attention(cfg, has_bias_table)
        self.layer_norm = T5RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x, bias):
        return x + self.SelfAttention(self.layer_norm(x), bias)


class T5GatedGELU(nn.Module):
    """wo(gelu_tanh(wi_0 h) * wi_1 h): T5 v1.1's gated feed-forward ("gated-gelu" is gelu_new)."""

    def __init__(self, cfg):
        super().__init__()
        self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, h):
        return self.wo(F.gelu(self.wi_0(h), approximate="tanh") * self.wi_1(h))


class T5FeedForwardLayer(nn.Module):
    """x + FF(RMS x), as transformers' layer.1."""

    def __init__(self, cfg):
        super().__init__()
        self.DenseReluDense = T5GatedGELU(cfg)
        self.layer_norm = T5RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x):
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    """One encoder layer: `layer.0` attention, `layer.1` feed-forward."""

    def __init__(self, cfg, has_bias_table):
        super().__init__()
        self.layer = nn.ModuleList([T5SelfAttentionLayer(cfg, has_bias_table), T5FeedForwardLayer(cfg)])

    def forward(self, x, bias):
        return self.layer[1](self.layer[0](x, bias))


class T5Stack(nn.Module):
    """The blocks and final norm, under transformers' name `encoder`."""

    def __init__(self, cfg, embed_tokens):
        super().__init__()
        self.embed_tokens = embed_tokens  # the same module as T5Encoder.shared
        self.block = nn.ModuleList([T5Block(cfg, has_bias_table=i == 0) for i in range(cfg.num_layers)])
        self.final_layer_norm = T5RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)


class T5Encoder(nn.Module):
    """T5EncoderModel: forward(ids (B, L), attention_mask (B, L) of 1 keep / 0 drop, or None)
    -> last_hidden_state (B, L, d_model). SD3 passes no mask (pads are attended to)."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.config = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = T5Stack(cfg, self.shared)

    def forward(self, ids, attention_mask=None):
        L = ids.shape[1]
        x = self.encoder.embed_tokens(ids)  # (B, L, D); T5 does not scale the embedding
        bias = self.encoder.block[0].layer[0].SelfAttention.position_bias(L, ids.device)  # (1, H, L, L)
        if attention_mask is not None:
            # masked keys get transformers' additive finfo.min; masked queries are still computed
            drop = (1.0 - attention_mask.float())[:, None, None, :]  # (B, 1, 1, L)
            bias = bias + drop * torch.finfo(torch.float32).min
        for block in self.encoder.block:
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)

    def _load_from_state_dict(self, state_dict, prefix, *args):
        # The embedding is tied: our state dict names it twice (shared, encoder.embed_tokens), as
        # transformers' does, but transformers' save_pretrained files store only shared.weight.
        if prefix + "shared.weight" in state_dict:
            state_dict.setdefault(prefix + "encoder.embed_tokens.weight", state_dict[prefix + "shared.weight"])
        super()._load_from_state_dict(state_dict, prefix, *args)
