"""SD3's prompt encoding: three text encoders -> the MMDiT's text condition, as diffusers'
StableDiffusion3Pipeline.encode_prompt computes it.

    clip   = cat(CLIP-L hidden_states[-2] (B, 77, 768), bigG hidden_states[-2] (B, 77, 1280), dim -1),
             zero-padded on the right to joint_dim (4096)
    tokens = cat([clip, T5 (B, 256, 4096)], dim -2)              (B, 333, 4096)
    pooled = cat(CLIP-L pooled (B, 768), bigG pooled (B, 1280))  (B, 2048)

Without T5 (SD3 runs without text_encoder_3) zeros stand in for its part. The empty prompt ""
encoded this way is SD3's unconditional ∅; it is not zeros. Each encoder reads the
same prompt (diffusers' prompt_2 = prompt_3 = prompt), with clip_skip None.

Reference: diffusers' StableDiffusion3Pipeline.encode_prompt.
"""

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..guidance import Text
from .clip import CLIPTextEncoder
from .loader import component_dir, has_component, load_text_encoder, read_config
from .t5 import T5Encoder
from .tokenizers import CLIPTokenizer, T5Tokenizer

SD3_JOINT_DIM = 4096  # SD3's joint_attention_dim: T5-XXL's width
SD3_T5_LENGTH = 256  # diffusers' max_sequence_length for SD3


@dataclass
class TextEncoders:
    """SD3's three text encoders and their tokenizers (T5 optional).

    Calling it on B prompts gives a Text with tokens (B, 77 + t5_length, joint_dim) and pooled
    (B, P_L + P_G), in the encoders' dtype (diffusers also returns the encoders' dtype), on
    their device.
    """

    tokenizer: CLIPTokenizer  # CLIP-L
    text_encoder: CLIPTextEncoder
    tokenizer_2: CLIPTokenizer  # OpenCLIP bigG
    text_encoder_2: CLIPTextEncoder
    tokenizer_3: T5Tokenizer | None  # T5 v1.1 XXL, or None: zeros stand in for it
    text_encoder_3: T5Encoder | None
    joint_dim: int = SD3_JOINT_DIM  # the transformer's joint_attention_dim (T5's width)
    t5_length: int = SD3_T5_LENGTH  # T5 tokens, also without T5 (the zeros' length)

    def __post_init__(self):
        if (self.tokenizer_3 is None) != (self.text_encoder_3 is None):
            raise ValueError("T5 needs both tokenizer_3 and text_encoder_3, or neither")
        clip_width = self.text_encoder.config.hidden_size + self.text_encoder_2.config.hidden_size
        if clip_width > self.joint_dim:
            raise ValueError(f"the two CLIP widths sum to {clip_width}, more than joint_dim {self.joint_dim}")
        if self.text_encoder_3 is not None and self.text_encoder_3.config.d_model != self.joint_dim:
            raise ValueError(f"T5's d_model ({self.text_encoder_3.config.d_model}) must equal "
                             f"joint_dim ({self.joint_dim}), the transformer's joint_attention_dim")
        if self.tokenizer_3 is not None and self.tokenizer_3.max_length != self.t5_length:
            raise ValueError(f"tokenizer_3 pads to {self.tokenizer_3.max_length} tokens but t5_length "
                             f"is {self.t5_length}")

    @classmethod
    def load(cls, model_dir, device="cpu", dtype=None, t5_length=SD3_T5_LENGTH, joint_dim=None):
        """The tokenizers (tokenizer/, tokenizer_2/, tokenizer_3/) and encoders (text_encoder*/) of
        a diffusers-layout folder; T5 only if text_encoder_3/ exists. joint_dim defaults to
        transformer/config.json's joint_attention_dim, else T5's width, else SD3's 4096."""
        t5 = has_component(model_dir, "text_encoder_3")
        text_encoder_3 = load_text_encoder(model_dir, "text_encoder_3", device, dtype) if t5 else None
        if joint_dim is None:
            config = read_config(os.path.join(model_dir, "transformer")) or {}
            fallback = text_encoder_3.config.d_model if t5 else SD3_JOINT_DIM
            joint_dim = config.get("joint_attention_dim", fallback)
        return cls(
            tokenizer=CLIPTokenizer.from_folder(component_dir(model_dir, "tokenizer")),
            text_encoder=load_text_encoder(model_dir, "text_encoder", device, dtype),
            tokenizer_2=CLIPTokenizer.from_folder(component_dir(model_dir, "tokenizer_2")),
            text_encoder_2=load_text_encoder(model_dir, "text_encoder_2", device, dtype),
            tokenizer_3=T5Tokenizer.from_folder(component_dir(model_dir, "tokenizer_3"), t5_length) if t5 else None,
            text_encoder_3=text_encoder_3, joint_dim=joint_dim, t5_length=t5_length)

    @torch.no_grad()
    def __call__(self, prompts):
        """B prompts (a list of strings, or one string) -> Text(tokens (B, 77 + t5_length,
        joint_dim), pooled (B, P_L + P_G)) in the encoders' dtype."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a string or a non-empty list of strings")
        device = self.text_encoder.text_projection.weight.device
        hidden_l, pooled_l = self.text_encoder(self.tokenizer(prompts).to(device))  # (B, 77, D_L), (B, P_L)
        hidden_g, pooled_g = self.text_encoder_2(self.tokenizer_2(prompts).to(device))  # (B, 77, D_G), (B, P_G)
        clip = torch.cat([hidden_l, hidden_g], dim=-1)  # (B, 77, D_L + D_G)
        clip = F.pad(clip, (0, self.joint_dim - clip.shape[-1]))  # (B, 77, joint_dim), zeros on the right
        if self.text_encoder_3 is None:
            t5 = clip.new_zeros(len(prompts), self.t5_length, self.joint_dim)  # (B, t5_length, joint_dim)
        else:
            t5 = self.text_encoder_3(self.tokenizer_3(prompts).to(device))  # (B, t5_length, joint_dim)
        # One dtype for the whole condition, should the encoders have been given different ones.
        tokens = torch.cat([clip, t5.to(clip.dtype)], dim=-2)  # (B, 77 + t5_length, joint_dim)
        return Text(tokens, torch.cat([pooled_l, pooled_g], dim=-1))  # pooled (B, P_L + P_G)
