"""A tiny random SD3 model folder in the real diffusers layout, for tests and demos without downloads.

`write_tiny_sd3(folder)` writes every file of an SD3 checkpoint folder (model_index.json, the
scheduler, transformer, vae, three text encoders and three tokenizers) at toy sizes, so that both
our loader and diffusers' `StableDiffusion3Pipeline.from_pretrained` read it: a test can then put
our code and the reference libraries side by side on the same files.

The weights are our own modules (MMDiT, VAE, CLIPTextEncoder, T5Encoder), every parameter redrawn
from a seeded generator at a fan-in scale, so activations stay O(1) and every output is a
nontrivial function of its input (DiT's zero init would make the MMDiT output exactly zero). The
vocabularies are built here, deterministically: a byte-level BPE vocabulary with merges learned
over a fixed list of prompt words, and a unigram vocabulary of those words.
"""

import os
import shutil
import string
from collections import Counter
from dataclasses import asdict

import torch

from ..mmdit import MMDiT, MMDiTConfig
from .clip import LEGACY_EOS_ID, CLIPConfig, CLIPTextEncoder
from .loader import DIFFUSERS_VERSION, save_component, write_json
from .t5 import T5Config, T5Encoder
from .tokenizers import BOS, BYTE_TO_CHAR, EOS, bpe
from .vae import VAE, VAEConfig

# Every size of the tiny model (SD3-medium's in the comments). SD3 concatenates the CLIP-L and bigG
# sequence features (16 + 32 = 48 <= joint_attention_dim 64, the rest zero-padded) and their
# pooled projections (16 + 32 = pooled_projection_dim 48); T5's width is joint_attention_dim.
# The vocabulary sizes are those of the vocabularies built below.
SIZES = dict(
    clip_l=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                projection_dim=16, hidden_act="quick_gelu"),  # 768, 3072, 12, 12, 768
    clip_g=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                projection_dim=32, hidden_act="gelu"),  # 1280, 5120, 32, 20, 1280
    t5=dict(d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4),  # 4096, 64, 10240, 24, 64
    transformer=dict(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                     attention_head_dim=8, num_attention_heads=2, joint_attention_dim=64,
                     caption_projection_dim=16, pooled_projection_dim=48,
                     pos_embed_max_size=16),  # 128, 2, 16, 16, 24, 64, 24, 4096, 1536, 2048, 192
    vae=dict(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4,
             latent_channels=16),  # (128, 256, 512, 512), 2, 32, 16
)
SCALING_FACTOR, SHIFT_FACTOR = 1.5305, 0.0609  # SD3's latent scale and shift (its vae/config.json)
T5_EXTRA_IDS = 100  # T5's sentinel tokens <extra_id_0..99>, the last ids of its vocabulary
# T5's nmt_nfkc on single characters, for a tokenizer.json without its charsmap (a binary trie not
# built here): these become a space, these 30 controls are deleted, the full-width tilde is left
# alone, the rest is NFKC. Read from the single-character keys of T5 v1.1's charsmap.
NMT_SPACES = "\t\n\f\r\u1680\u200b\u200c\u200d\u200e\u200f\u2028\u2029\u2581\ufeff\ufffd"
NMT_DELETED = "".join(map(chr, [*range(0x1, 0x9), 0xB, *range(0xE, 0x20), 0x7F, 0x8F, 0x9F]))
TILDE = "\uff5e"

WORDS = """a an the of in on at with and by from to photo painting portrait drawing illustration
cat dog bird horse astronaut robot woman man child city street forest mountain river beach ocean
sky sunset night light lighting red blue green golden white black old small large beautiful
detailed high quality style oil cinematic sitting riding standing under over is are""".split()


def learn_merges(words):
    """BPE merges over `words`, each once: GPT-2 byte chars with "</w>" on the last; the most
    frequent adjacent pair (ties: the smallest) is merged, until every word is one symbol."""
    seqs = []
    for word in words:
        chars = [BYTE_TO_CHAR[b] for b in word.encode("utf-8")]
        chars[-1] += "</w>"
        seqs.append(chars)
    merges = []
    while True:
        counts = Counter(pair for s in seqs for pair in zip(s, s[1:]))
        if not counts:
            return merges
        pair = min(counts, key=lambda p: (-counts[p], p))
        merges.append(pair)
        seqs = [bpe(s, {pair: 0}) for s in seqs]  # one rank: applies exactly this merge


def clip_vocab(merges):
    """CLIP's vocabulary layout: the 256 byte chars ("!" is id 0), their "</w>" forms, one entry
    per merge, then <|startoftext|> and <|endoftext|>, so EOS is the largest id."""
    chars = list(BYTE_TO_CHAR.values())
    tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in merges] + [BOS, EOS]
    vocab = {}
    for t in tokens:
        vocab.setdefault(t, len(vocab))  # two merges may spell the same string; keep the first id
    return vocab


def t5_vocab():
    """[(piece, score)] laid out as T5's: <pad> 0, </s> 1, <unk> 2, "▁", the words with a leading
    "▁" (likelier than their letters, as in a trained model), single ASCII characters so that any
    ASCII text segments without <unk>, then the sentinels <extra_id_99> ... <extra_id_0>."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -3.0 - i / 100) for i, w in enumerate(WORDS)]
    vocab += [(c, -8.0) for c in string.ascii_letters + string.digits + string.punctuation]
    return vocab + [(f"<extra_id_{i}>", 0.0) for i in reversed(range(T5_EXTRA_IDS))]


def write_clip_tokenizer(folder, vocab, merges, pad_token):
    """vocab.json, merges.txt and the two config files of SD3's tokenizer/ and tokenizer_2/."""
    write_json(os.path.join(folder, "vocab.json"), vocab)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(["#version: 0.2"] + [f"{a} {b}" for a, b in merges]) + "\n")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    write_json(os.path.join(folder, "special_tokens_map.json"), special)
    # SD3's flags: only <|startoftext|> is "normalized" (matched after lowercasing).
    added = {str(vocab[t]): {"content": t, "lstrip": False, "normalized": t == BOS, "rstrip": False,
                             "single_word": False, "special": True} for t in dict.fromkeys([pad_token, BOS, EOS])}
    write_json(os.path.join(folder, "tokenizer_config.json"),
               {**special, "added_tokens_decoder": added, "model_max_length": 77, "do_lower_case": True,
                "tokenizer_class": "CLIPTokenizer"})


def write_t5_tokenizer(folder, vocab):
    """tokenizer.json and the configs of SD3's tokenizer_3/. The real file normalises with a
    precompiled nmt_nfkc charsmap; this one spells nmt_nfkc out with plain normalisers (NMT_SPACES,
    NMT_DELETED, NFKC except the full-width tilde), which tokenizers.py and `tokenizers` both
    follow as written. It differs from the charsmap only on combining sequences and new characters."""
    specials = [(i, p) for i, (p, _) in enumerate(vocab)
                if p in ("<pad>", "</s>", "<unk>") or p.startswith("<extra_id_")]
    sentinels = [f"<extra_id_{i}>" for i in range(T5_EXTRA_IDS)]
    metaspace = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}
    a, b, eos = ({"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 0}},
                 {"SpecialToken": {"id": "</s>", "type_id": 0}})
    write_json(os.path.join(folder, "tokenizer.json"), {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": p, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i, p in specials],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Replace", "pattern": {"Regex": f"[{NMT_SPACES}]"}, "content": " "},
            {"type": "Replace", "pattern": {"Regex": f"[{NMT_DELETED}]"}, "content": ""},
            {"type": "Replace", "pattern": {"String": TILDE}, "content": "\ue000"},  # NFKC must not touch it
            {"type": "NFKC"},
            {"type": "Replace", "pattern": {"String": "\ue000"}, "content": TILDE},
            {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}]},
        "pre_tokenizer": metaspace,
        "post_processor": {"type": "TemplateProcessing", "single": [a, eos], "pair": [a, eos, b, eos],
                           "special_tokens": {"</s>": {"id": "</s>", "ids": [1], "tokens": ["</s>"]}}},
        "decoder": metaspace,
        "model": {"type": "Unigram", "unk_id": 2, "vocab": [list(v) for v in vocab], "byte_fallback": False}})
    special = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>", "additional_special_tokens": sentinels}
    write_json(os.path.join(folder, "special_tokens_map.json"), special)
    write_json(os.path.join(folder, "tokenizer_config.json"),
               {**special, "extra_ids": T5_EXTRA_IDS, "model_max_length": 512, "tokenizer_class": "T5Tokenizer"})


def randomize(module, generator):
    """Redraw every parameter: weights N(0, 1/fan_in), biases N(0, 0.1^2), norm scales
    1 + N(0, 0.1^2), in named_parameters order (so one seed gives one model)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=generator, device=generator.device)
            if p.dim() > 1:
                p.copy_(noise / (p[0].numel() ** 0.5))  # fan_in = inputs per output row
            else:
                p.copy_(0.1 * noise + (0.0 if name.endswith("bias") else 1.0))
    return module.eval()


def random_t5(cfg, generator):
    """A randomized T5Encoder with q further scaled by 1/sqrt(d_kv): T5 attends without that scale
    and its own init puts it into q. (Unscaled, the attention is peaked enough that float32
    rounding alone makes two correct implementations differ by about 1e-5.)"""
    model = randomize(T5Encoder(cfg), generator)
    with torch.no_grad():
        for block in model.encoder.block:
            block.layer[0].SelfAttention.q.weight /= cfg.d_kv ** 0.5
    return model


def write_tiny_sd3(folder, seed=0, t5=True):
    """Write a tiny random SD3 model (sizes in SIZES) into `folder` in the diffusers layout and
    return the folder path. t5=False leaves out text_encoder_3/ and tokenizer_3/ and marks them
    [null, null] in model_index.json, as diffusers' save_pretrained does for SD3 without T5;
    diffusers then loads it with from_pretrained(folder, text_encoder_3=None, tokenizer_3=None).
    Atomic: written into FOLDER.partial, then renamed, so that a run stopped halfway leaves no
    half folder that a later run would take for a whole one."""
    final = os.fspath(folder).rstrip("/")
    folder = final + ".partial"
    shutil.rmtree(folder, ignore_errors=True)  # what a stopped earlier attempt left
    g = torch.Generator().manual_seed(seed)
    merges = learn_merges(WORDS)
    vocab, pieces = clip_vocab(merges), t5_vocab()
    # SD3's CLIP config.json files carry the legacy eos_token_id 2: CLIP then pools at argmax(ids),
    # which is the first EOS because clip_vocab gives EOS the largest id.
    with torch.random.fork_rng(devices=[]):  # module constructors draw from the global RNG; leave it as it was
        clip_l = randomize(CLIPTextEncoder(CLIPConfig(vocab_size=len(vocab), eos_token_id=LEGACY_EOS_ID,
                                                      **SIZES["clip_l"])), g)
        clip_g = randomize(CLIPTextEncoder(CLIPConfig(vocab_size=len(vocab), eos_token_id=LEGACY_EOS_ID,
                                                      **SIZES["clip_g"])), g)
        t5_cfg = T5Config(vocab_size=len(pieces), **SIZES["t5"])
        t5_model = random_t5(t5_cfg, g)  # drawn also for t5=False: one seed, the same other weights
        mmdit_cfg = MMDiTConfig(**SIZES["transformer"])
        mmdit = randomize(MMDiT(mmdit_cfg), g)
        vae = randomize(VAE(VAEConfig(scaling_factor=SCALING_FACTOR, shift_factor=SHIFT_FACTOR, **SIZES["vae"])), g)

    none = [None, None]
    write_json(os.path.join(folder, "model_index.json"), {
        "_class_name": "StableDiffusion3Pipeline", "_diffusers_version": DIFFUSERS_VERSION,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_3": ["transformers", "T5EncoderModel"] if t5 else none,
        # transformers 5 keeps T5TokenizerFast as an alias of its tokenizers-backed T5Tokenizer
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "tokenizer_3": ["transformers", "T5TokenizerFast"] if t5 else none,
        "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]})
    write_json(os.path.join(folder, "scheduler", "scheduler_config.json"), {
        "_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": 1000, "shift": 3.0})
    save_component(os.path.join(folder, "transformer"), "diffusion_pytorch_model.safetensors",
                   {"_class_name": "SD3Transformer2DModel", "_diffusers_version": DIFFUSERS_VERSION,
                    **asdict(mmdit_cfg)}, mmdit.state_dict())
    n = len(SIZES["vae"]["block_out_channels"])
    save_component(os.path.join(folder, "vae"), "diffusion_pytorch_model.safetensors", {
        "_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION, **asdict(vae.cfg),
        "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
        "act_fn": "silu", "sample_size": 8 * mmdit_cfg.sample_size, "latents_mean": None, "latents_std": None,
        "force_upcast": True, "use_quant_conv": False, "use_post_quant_conv": False,
        "mid_block_add_attention": True}, vae.state_dict())
    for name, model in (("text_encoder", clip_l), ("text_encoder_2", clip_g)):
        save_component(os.path.join(folder, name), "model.safetensors", {
            "architectures": ["CLIPTextModelWithProjection"], "model_type": "clip_text_model",
            # SD3's legacy special ids (bos 0, pad 1, eos 2), which transformers does not use for CLIP
            **asdict(model.config), "bos_token_id": 0, "pad_token_id": 1,
            "attention_dropout": 0.0, "initializer_range": 0.02, "initializer_factor": 1.0}, model.state_dict())
    write_clip_tokenizer(os.path.join(folder, "tokenizer"), vocab, merges, pad_token=EOS)
    write_clip_tokenizer(os.path.join(folder, "tokenizer_2"), vocab, merges, pad_token="!")  # id 0, as SD3's
    if t5:
        # transformers' save_pretrained stores the tied embedding once, as shared.weight
        save_component(os.path.join(folder, "text_encoder_3"), "model.safetensors", {
            "architectures": ["T5EncoderModel"], "model_type": "t5", **asdict(t5_cfg),
            "dense_act_fn": "gelu_new", "is_gated_act": True, "tie_word_embeddings": False,
            "is_encoder_decoder": True, "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
            "dropout_rate": 0.0, "initializer_factor": 1.0},
            {k: v for k, v in t5_model.state_dict().items() if k != "encoder.embed_tokens.weight"})
        write_t5_tokenizer(os.path.join(folder, "tokenizer_3"), pieces)
    if os.path.isdir(final) and not os.listdir(final):  # an empty folder made for it (pytest's mktemp)
        os.rmdir(final)
    os.replace(folder, final)
    return final
