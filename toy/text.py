"""A tiny text encoder with SD3-shaped outputs, for the toy world.

SD3 conditions on two things from its frozen text encoders: a sequence of token embeddings (what
the joint attention sees) and one pooled vector (what drives adaLN through F). This encoder gives
the same two: a word-level tokenizer over the dataset's vocabulary, a small bidirectional
transformer, the token states (pads zeroed) and a pooled vector read at the end token, as CLIP
pools at its EOS token. It is trained together with the toy teacher and then frozen, like SD3's
encoders; the empty prompt "" (∅) encodes to [BOS, EOS].
"""

import itertools
import math

import torch
import torch.nn as nn

from tinyteef.guidance import Text

from .data import words

PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]


class Tokenizer:
    """Words -> ids: [BOS, w_1, ..., w_n, EOS, PAD, ...] of a fixed length (truncation keeps EOS).
    Unknown words map to UNK."""

    def __init__(self, vocabulary, length):
        self.vocabulary, self.length = list(vocabulary), length
        self.index = {w: i for i, w in enumerate(SPECIALS + self.vocabulary)}

    def __len__(self):
        return len(self.index)

    def __call__(self, prompts):
        """list of B strings -> (B, length) int64."""
        ids = torch.full((len(prompts), self.length), PAD, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            body = [self.index.get(w, UNK) for w in words(prompt)][: self.length - 2]
            ids[row, : len(body) + 2] = torch.tensor([BOS, *body, EOS])
        return ids


class TextEncoder(nn.Module):
    """Token embedding + learned positions + a few pre-norm transformer layers.

    forward(ids (B, L)) -> Text(tokens (B, L, width), pooled (B, pooled_dim)).
    """

    def __init__(self, vocab_size, length, width=128, layers=2, heads=4, pooled_dim=128):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width)
        self.pos = nn.Parameter(torch.randn(1, length, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, pooled_dim, bias=False)  # like CLIP's text_projection

    def forward(self, ids):
        pad = ids == PAD  # (B, L)
        h = self.norm(self.layers(self.embed(ids) + self.pos, src_key_padding_mask=pad))  # (B, L, width)
        eos = (ids == EOS).float().argmax(dim=1)  # (B,) position of the end token
        pooled = self.proj(h[torch.arange(ids.shape[0], device=ids.device), eos])  # (B, pooled_dim)
        return Text(h.masked_fill(pad[..., None], 0.0), pooled)


class PromptBank:
    """Every prompt a dataset can produce, tokenised once: ids (K, T, L) for K label combinations
    and T templates, kept on the device, so drawing a batch's prompts is one gather."""

    def __init__(self, data, tokenizer, device="cpu"):
        classes = data.classes
        self.radix = torch.tensor([math.prod(classes[a + 1:]) for a in range(len(classes))], device=device)
        combos = itertools.product(*(range(n) for n in classes))  # in the order of `radix`
        prompts = [data.fill(tmpl, y) for y in combos for tmpl in data.templates]
        K, T = math.prod(classes), len(data.templates)
        self.ids = tokenizer(prompts).view(K, T, tokenizer.length).to(device)  # (K, T, L)
        self.empty = tokenizer([""]).to(device)  # (1, L), ∅

    def sample(self, y, generator=None):
        """Token ids of one prompt per label row y (B, A), with a template drawn at random. (B, L)."""
        pick = torch.randint(self.ids.shape[1], (y.shape[0],), generator=generator, device=y.device)
        return self.ids[(y * self.radix).sum(dim=1), pick]
