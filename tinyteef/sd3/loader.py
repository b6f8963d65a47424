"""Loading SD3 / SD3.5 components from the diffusers folder layout into our modules.

A model folder holds `transformer/`, `vae/`, `text_encoder/` (CLIP-L), `text_encoder_2/` (OpenCLIP
bigG), optionally `text_encoder_3/` (T5; SD3 runs without it) and the tokenizer folders. Each
component folder has a config.json and its weights as one `*.safetensors` file or shards with an
`*.safetensors.index.json`. Our modules use the reference libraries' parameter names, so a state
dict loads as it is; the config comes from config.json, or for the MMDiT from the tensor shapes.
Weights are read with our own safetensors reader: nothing is unpickled.
"""

import json
import math
import os
from dataclasses import asdict, fields

import torch

from .. import checkpoint
from ..guidance import PAPER_W_RANGE, TEEFUSION_DIVISOR, DistillCFG, Student
from ..mmdit import MMDiT, MMDiTConfig
from ..safetensors import load_file, load_sharded, read_header, save_file
from .clip import CLIPConfig, CLIPTextEncoder
from .t5 import T5Config, T5Encoder
from .vae import VAE, VAEConfig

GUIDANCE_PREFIX = "guidance_in."  # DistillCFG's H in the authors' checkpoints
STUDENT_RECORD = "tinyteef"  # train_sd3.py's record in a student's config.json (read by load_student)
DIFFUSERS_VERSION = "0.29.0.dev0"  # the version that SD3-medium's config files record
PIPELINE_PARTS = ("scheduler", "vae", "text_encoder", "text_encoder_2", "text_encoder_3",
                  "tokenizer", "tokenizer_2", "tokenizer_3")  # every folder but transformer/


def component_dir(model_dir, name):
    """`model_dir/name`, or a clear error naming what is missing and the layout expected."""
    path = os.path.join(model_dir, name)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{model_dir} has no {name}/ folder: expected the diffusers layout "
                                "(transformer/, vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/)")
    return path


def read_config(folder):
    """config.json of a component folder as a dict, or None when there is none."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e})") from e


def config_from_json(cls, d):
    """A config dataclass from a config.json dict: the keys it knows, the rest ignored."""
    return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


def read_weights(folder, device="cpu"):
    """Every tensor of a component folder (one .safetensors file, or shards with an index)."""
    if not any(f.endswith(".safetensors") for f in os.listdir(folder)):
        raise FileNotFoundError(f"{folder} has no .safetensors weights (the diffusers layout stores "
                                "them as diffusion_pytorch_model.safetensors or model.safetensors)")
    return load_sharded(folder, device)


def infer_mmdit_config(state):
    """An MMDiTConfig from the shapes of a diffusers-layout MMDiT state dict.

    The head size cannot be read from shapes without qk-norm; SD3 and SD3.5 all use 64.
    """
    proj = state["pos_embed.proj.weight"]  # (D, C, p, p)
    D, C, p = proj.shape[0], proj.shape[1], proj.shape[-1]
    qk_norm = "transformer_blocks.0.attn.norm_q.weight" in state
    head = state["transformer_blocks.0.attn.norm_q.weight"].shape[0] if qk_norm else 64
    if D % head:
        raise ValueError(f"cannot infer the head size of a {D}-wide MMDiT without qk-norm (SD3 uses 64); "
                         "put its config.json beside the weights")
    blocks = {int(k.split(".")[1]) for k in state if k.startswith("transformer_blocks.")}
    return MMDiTConfig(
        patch_size=p, in_channels=C, out_channels=state["proj_out.weight"].shape[0] // (p * p),
        num_layers=len(blocks), attention_head_dim=head, num_attention_heads=D // head,
        joint_attention_dim=state["context_embedder.weight"].shape[1], caption_projection_dim=D,
        pooled_projection_dim=state["time_text_embed.text_embedder.linear_1.weight"].shape[1],
        pos_embed_max_size=math.isqrt(state["pos_embed.pos_embed"].shape[1]),
        qk_norm="rms_norm" if qk_norm else None,
        dual_attention_layers=tuple(sorted(i for i in blocks if f"transformer_blocks.{i}.attn2.to_q.weight" in state)))


def load_state(model, state, where):
    """Load a state dict and insist that it fits exactly, saying which key does not and how.
    (Non-strict loading first, so that modules that fill keys themselves, such as T5's tied
    embedding, are asked; every missing or unexpected key still raises.)"""
    ours = model.state_dict()
    for k, v in state.items():
        if k in ours and ours[k].shape != v.shape:
            raise ValueError(f"{where}: {k} has shape {tuple(v.shape)} in the checkpoint but "
                             f"{tuple(ours[k].shape)} in the model its config describes")
        # integer or bool data for a floating-point parameter is a damaged or foreign file: loading
        # would cast it to float silently and sample from nonsense
        if k in ours and ours[k].is_floating_point() and not (v.is_floating_point() or v.is_complex()):
            raise ValueError(f"{where}: {k} is stored as {v.dtype} but the model holds floating-point "
                             f"weights there; the file is damaged or not this model's: re-download it")
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{where}: the checkpoint fits no known layout: "
                         f"{len(result.missing_keys)} keys missing (first: {result.missing_keys[:1]}), "
                         f"{len(result.unexpected_keys)} unexpected (first: {result.unexpected_keys[:1]})")
    return model


def load_transformer(model_dir, device="cpu", dtype=None):
    """The MMDiT of `model_dir/transformer`, and DistillCFG's H if the checkpoint has one.

    The authors' released TeEFusion student is a plain SD3 transformer (its config.json adds
    "txt_align_guidance": true, which we ignore: the Eq. 7 term needs no parameters).
    Returns (MMDiT, DistillCFG or None).
    """
    folder = component_dir(model_dir, "transformer")
    state = read_weights(folder, device)
    H_state = {k[len(GUIDANCE_PREFIX):]: state.pop(k) for k in list(state) if k.startswith(GUIDANCE_PREFIX)}
    d = read_config(folder)
    cfg = config_from_json(MMDiTConfig, d) if d is not None else infer_mmdit_config(state)
    model = load_state(MMDiT(cfg), state, folder).to(device, dtype)
    H = None
    if H_state:
        H = load_state(DistillCFG(cfg.hidden_size), H_state, folder + " (guidance_in)").to(device, dtype)
    return model, H


def load_student(model_dir, device="cpu", dtype=None, divisor=None, w_rounding=None):
    """A distilled student (guidance.Student) from `model_dir/transformer`. Ours carry a record
    under "tinyteef" in config.json (train_sd3.py: student kind, Eq. 7 divisor, the w range it was
    distilled on, how 1000 w was built); without one (the authors' released student) it is TeEFusion
    with divisor 256, the paper's w range and 1000 w rounded in bf16 as the authors' pipeline builds
    it ("authors-bf16"), or DistillCFG when the weights hold guidance_in. A record written before
    the rounding was recorded means "float32", the only one ours were distilled with. `divisor`
    and `w_rounding`, if given, override the record."""
    model, H = load_transformer(model_dir, device, dtype)
    record = (read_config(os.path.join(model_dir, "transformer")) or {}).get(STUDENT_RECORD, {})
    kind = record.get("student_kind", "distillcfg" if H is not None else "teefusion")
    divisor = record.get("teefusion_divisor", TEEFUSION_DIVISOR) if divisor is None else divisor
    if w_rounding is None:
        w_rounding = record.get("w_rounding", "float32") if record else "authors-bf16"
    return Student(model, kind, H, divisor, tuple(record.get("w_range", PAPER_W_RANGE)), w_rounding)


def load_vae(model_dir, device="cpu", dtype=None):
    """The autoencoder of `model_dir/vae`."""
    folder = component_dir(model_dir, "vae")
    d = read_config(folder)
    model = VAE(config_from_json(VAEConfig, d) if d is not None else VAEConfig())
    return load_state(model, read_weights(folder, device), folder).to(device, dtype)


def load_text_encoder(model_dir, name, device="cpu", dtype=None):
    """A text encoder by folder name: text_encoder / text_encoder_2 (CLIP) or text_encoder_3 (T5)."""
    folder = component_dir(model_dir, name)
    d = read_config(folder)
    if d is None:
        raise FileNotFoundError(f"{folder} has no config.json; it is needed to size the text encoder")
    if name == "text_encoder_3":
        model = T5Encoder(config_from_json(T5Config, d))
    else:
        model = CLIPTextEncoder(config_from_json(CLIPConfig, d))
    return load_state(model, read_weights(folder, device), folder).to(device, dtype).eval()


def has_component(model_dir, name):
    """Whether the folder has an optional component (SD3 can run without text_encoder_3)."""
    return os.path.isdir(os.path.join(model_dir, name))



ORIGINAL_PREFIX = "model.diffusion_model."


def _swap_halves(w):
    """Stability's final adaLN chunks are (shift, scale); diffusers' (and ours) are (scale, shift)."""
    shift, scale = w.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


def from_original(state):
    """Map an MMDiT state dict of Stability's original single-file layout (`model.diffusion_model.*`,
    fused qkv) onto our (diffusers') names, as diffusers' own conversion does (the tests compare the two)."""
    s = {k[len(ORIGINAL_PREFIX):] if k.startswith(ORIGINAL_PREFIX) else k: v for k, v in state.items()}
    out = {"pos_embed.pos_embed": s["pos_embed"], "context_embedder.weight": s["context_embedder.weight"],
           "context_embedder.bias": s["context_embedder.bias"]}
    rename = {"x_embedder.proj": "pos_embed.proj", "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
              "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
              "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
              "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2", "final_layer.linear": "proj_out"}
    for old, new in rename.items():
        for p in ("weight", "bias"):
            out[f"{new}.{p}"] = s[f"{old}.{p}"]
    for p in ("weight", "bias"):
        out[f"norm_out.linear.{p}"] = _swap_halves(s[f"final_layer.adaLN_modulation.1.{p}"])
    blocks = sorted({int(k.split(".")[1]) for k in s if k.startswith("joint_blocks.")})
    for i in blocks:
        src, dst = f"joint_blocks.{i}.", f"transformer_blocks.{i}."
        last = f"{src}context_block.attn.proj.weight" not in s  # context_pre_only: no text output
        streams = {"x_block.attn": ("attn.to_{}", "attn.to_out.0", "attn.norm_{}"),
                   "context_block.attn": ("attn.add_{}_proj", None if last else "attn.to_add_out",
                                          "attn.norm_added_{}"),
                   "x_block.attn2": ("attn2.to_{}", "attn2.to_out.0", "attn2.norm_{}")}
        for name, (qkv, proj, norm) in streams.items():
            if f"{src}{name}.qkv.weight" not in s:
                continue  # attn2 only in MMDiT-X blocks
            for p in ("weight", "bias"):
                for part, tensor in zip("qkv", s[f"{src}{name}.qkv.{p}"].chunk(3, dim=0)):
                    out[f"{dst}{qkv.format(part)}.{p}"] = tensor
                if proj is not None:
                    out[f"{dst}{proj}.{p}"] = s[f"{src}{name}.proj.{p}"]
            for qk in "qk":
                if f"{src}{name}.ln_{qk}.weight" in s:
                    out[f"{dst}{norm.format(qk)}.weight"] = s[f"{src}{name}.ln_{qk}.weight"]
        for p in ("weight", "bias"):
            out[f"{dst}norm1.linear.{p}"] = s[f"{src}x_block.adaLN_modulation.1.{p}"]
            ctx = s[f"{src}context_block.adaLN_modulation.1.{p}"]
            out[f"{dst}norm1_context.linear.{p}"] = _swap_halves(ctx) if last else ctx
            for block, ff in (("x_block", "ff"), ("context_block", "ff_context")):
                if f"{src}{block}.mlp.fc1.{p}" in s:
                    out[f"{dst}{ff}.net.0.proj.{p}"] = s[f"{src}{block}.mlp.fc1.{p}"]
                    out[f"{dst}{ff}.net.2.{p}"] = s[f"{src}{block}.mlp.fc2.{p}"]
    return out


def load_single_file(path, device="cpu", dtype=None):
    """An MMDiT from one .safetensors file in Stability's original layout (e.g. sd3_medium.safetensors;
    only the model.diffusion_model.* tensors are read). The config is inferred from the shapes."""
    keys = [k for k in read_header(path)[0] if k.startswith(ORIGINAL_PREFIX)]
    if not keys:
        raise ValueError(f"{path} has no {ORIGINAL_PREFIX}* tensors: not an original-layout SD3 checkpoint "
                         "(for a diffusers folder use load_transformer)")
    state = from_original(load_file(path, device, keys=keys))
    return load_state(MMDiT(infer_mmdit_config(state)), state, path).to(device, dtype)


def write_json(path, obj):
    """Write obj as indented JSON (UTF-8, "▁" kept as it is)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)


def save_component(folder, filename, config, state):
    """A component folder: config.json and the tensors of `state` as one safetensors file."""
    write_json(os.path.join(folder, "config.json"), config)
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(folder, filename),
              metadata={"format": "pt"})


def save_transformer(model_dir, model, H=None, extra_config=None):
    """Write `model_dir/transformer` in the diffusers layout, readable by load_transformer and by
    diffusers' SD3Transformer2DModel.from_pretrained; DistillCFG's H goes under guidance_in.
    (diffusers ignores those keys, and the keys of `extra_config`, with a warning)."""
    state = dict(model.state_dict())
    if H is not None:
        state.update({GUIDANCE_PREFIX + k: v for k, v in H.state_dict().items()})
    config = {"_class_name": "SD3Transformer2DModel", "_diffusers_version": DIFFUSERS_VERSION,
              **asdict(model.config), **(extra_config or {})}
    save_component(os.path.join(model_dir, "transformer"), "diffusion_pytorch_model.safetensors", config, state)


def link_components(model_dir, source_dir):
    """Make `model_dir` a whole SD3 folder around its transformer/: model_index.json copied and
    every other component a symbolic link to `source_dir`'s (the teacher's) folder."""
    with open(os.path.join(source_dir, "model_index.json")) as f:
        write_json(os.path.join(model_dir, "model_index.json"), json.load(f))
    for name in PIPELINE_PARTS:
        src, dst = os.path.abspath(os.path.join(source_dir, name)), os.path.join(model_dir, name)
        if os.path.isdir(src) and not os.path.lexists(dst):
            os.symlink(src, dst, target_is_directory=True)


def save_student(folder, student, teacher_dir=None, record=None):
    """`folder` as a whole SD3 folder of a distilled student (guidance.Student), in the diffusers
    layout: transformer/ written (H under guidance_in., `record` under "tinyteef" in its
    config.json, read back by load_student), every other component linked to the teacher's folder.

    `folder` is a symbolic link to the newest version, `folder.N` beside it: each save writes a whole
    new version, then replaces the link in one rename (checkpoint.swap_in), so `folder` is a complete
    student at every instant and a save stopped anywhere leaves the previous one. The older versions
    are deleted after the swap, and what a stopped save left is deleted by the next one."""
    new = checkpoint.next_version(folder)
    save_transformer(new, student.model, student.H, {STUDENT_RECORD: record or {}})
    if teacher_dir is not None:
        link_components(new, teacher_dir)
    checkpoint.swap_in(folder, new)
