"""The CLIP text encoder with projection: SD3's CLIP-L (text_encoder) and OpenCLIP bigG
(text_encoder_2).

A pre-LN transformer over 77 tokens with learned positions and a causal mask. SD3 reads two
things from it:

- the sequence features hidden_states[-2], the output of layer N-1 *without* the final layer
  norm (clip_skip=k moves back to hidden_states[-(k+2)]);
- the pooled vector text_projection(final_layer_norm(last)[EOS]), at the first EOS of each row.

Parameter names equal those of transformers' `CLIPTextModelWithProjection`, whose state dicts
(and SD3's diffusers-layout text_encoder/ and text_encoder_2/ files) load with
`load_state_dict(strict=True)`.

Reference: Radford et al. 2021 (CLIP); transformers' modeling_clip.py (5.23).
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# The activations of config.json's hidden_act: CLIP-L (OpenAI) uses x * sigmoid(1.702 x),
# OpenCLIP bigG the exact (erf) GELU.
ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": F.gelu,
}
LEGACY_EOS_ID = 2  # the eos_token_id that old CLIP config.json files carry (see `eos_positions`)


@dataclass
class CLIPConfig:
    """Sizes of a CLIP text tower; field names are transformers' config.json keys. Defaults: CLIP-L."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768
    eos_token_id: int = 49407

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {sorted(ACTIVATIONS)}, got {self.hidden_act!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of "
                             f"num_attention_heads ({self.num_attention_heads})")


# OpenCLIP ViT-bigG/14's text tower, SD3's text_encoder_2.
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              hidden_act="gelu", projection_dim=1280)


class CLIPEmbeddings(nn.Module):
    """Token embedding plus a learned absolute position embedding."""

    def __init__(self, cfg):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, ids):  # ids (B, L) -> (B, L, D)
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self.token_embedding(ids) + self.position_embedding(pos)[None]

    def _load_from_state_dict(self, state_dict, prefix, *args):
        # transformers before 4.31 saved its position_ids buffer (always arange(77)); it is
        # non-persistent since, and in 5.23 absent from the state dict. Ignore it as transformers does.
        state_dict.pop(prefix + "position_ids", None)
        super()._load_from_state_dict(state_dict, prefix, *args)


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention, scale 1/sqrt(head_dim), with biases."""

    def __init__(self, cfg):
        super().__init__()
        D = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x):  # x (B, L, D)
        B, L, D = x.shape
        q, k, v = (p(x).view(B, L, self.heads, -1).transpose(1, 2)  # (B, H, L, D/H)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, L, D/H)
        return self.out_proj(o.transpose(1, 2).reshape(B, L, D))


class CLIPMLP(nn.Module):
    """fc1 - activation - fc2."""

    def __init__(self, cfg):
        super().__init__()
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPLayer(nn.Module):
    """Pre-LN block: x += attn(LN1 x); x += mlp(LN2 x)."""

    def __init__(self, cfg):
        super().__init__()
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x):  # x (B, L, D)
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPStack(nn.Module):
    """The layers, under transformers' name `encoder.layers`."""

    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.ModuleList([CLIPLayer(cfg) for _ in range(cfg.num_hidden_layers)])


class CLIPTextTransformer(nn.Module):
    """Embeddings, layers and final layer norm, under transformers' name `text_model`."""

    def __init__(self, cfg):
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPStack(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


def eos_positions(ids, eos_token_id):
    """Index of the token that CLIP pools, per row, by transformers' rule (modeling_clip.py, 5.23):
    the first position of eos_token_id; for a config with the legacy eos_token_id 2, argmax(ids),
    the first position of the largest id. With SD3's vocabulary both are the first 49407 (EOS is
    the largest id), also when the row is padded with EOS. ids (B, L) -> (B,)."""
    if eos_token_id == LEGACY_EOS_ID:
        return ids.argmax(dim=-1)
    is_eos = ids == eos_token_id  # (B, L)
    if not is_eos.any(dim=-1).all():
        raise ValueError(f"every row of ids needs an EOS token (id {eos_token_id}) to pool at")
    return is_eos.int().argmax(dim=-1)  # argmax returns the first maximal index


class CLIPTextEncoder(nn.Module):
    """CLIPTextModelWithProjection as SD3 uses it.

    forward(ids (B, L <= 77), clip_skip=None) -> (hidden (B, L, D), pooled (B, projection_dim)):
    hidden is hidden_states[-(clip_skip + 2)] (default hidden_states[-2]), never normalised;
    pooled is the projected, final-normed state at the first EOS. No attention mask: SD3 passes
    none, so pads are attended to (causally) like any token.
    """

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.config = cfg
        self.text_model = CLIPTextTransformer(cfg)
        self.text_projection = nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)

    def forward(self, ids, clip_skip=None):
        cfg, tm = self.config, self.text_model
        if ids.dim() != 2 or ids.shape[1] > cfg.max_position_embeddings:
            raise ValueError(f"ids must be (B, L) with L <= {cfg.max_position_embeddings}, "
                             f"got {tuple(ids.shape)}")
        n = cfg.num_hidden_layers
        keep = n - 1 - (clip_skip or 0)  # hidden_states[j] is the output of the first j layers
        if not 0 <= keep < n:
            raise ValueError(f"clip_skip must be in [0, {n - 1}], got {clip_skip}")
        x = tm.embeddings(ids)  # (B, L, D)
        hidden = x
        for i, layer in enumerate(tm.encoder.layers):
            x = layer(x)
            if i + 1 == keep:
                hidden = x
        last = tm.final_layer_norm(x)  # (B, L, D)
        at = eos_positions(ids, cfg.eos_token_id)  # (B,)
        pooled = self.text_projection(last[torch.arange(ids.shape[0], device=ids.device), at])
        return hidden, pooled  # (B, L, D), (B, P)
