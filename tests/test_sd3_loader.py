"""sd3/loader.py on folders that the reference libraries wrote themselves (save_pretrained), so the
real file layouts are read; outputs are compared with the reference models', within 1e-4 of the
reference's scale."""

import json
import os

import pytest
import torch

from conftest import TINY, assert_close_to_reference, oracle, random_mmdit
from tinyteef.guidance import Text
from tinyteef.safetensors import load_file, save_file
from tinyteef.sd3 import loader
from tinyteef.sd3.loader import (from_original, infer_mmdit_config, load_single_file, load_student,
                                 load_text_encoder, load_transformer, load_vae)

TINY_35 = {**TINY, "qk_norm": "rms_norm", "dual_attention_layers": (0,)}
# without qk-norm the head size cannot be read from shapes: the loader assumes SD3's 64
TINY_64 = {**TINY, "attention_head_dim": 64, "num_attention_heads": 1, "caption_projection_dim": 64}


def mmdit_inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, generator=g),
            torch.randn(2, 5, 12, generator=g), torch.randn(2, 10, generator=g))


def save_transformer(tmp_path, config):
    diffusers = oracle("diffusers")
    torch.manual_seed(0)
    ref = diffusers.SD3Transformer2DModel(**config).eval()
    ref.save_pretrained(tmp_path / "transformer")
    return ref


@pytest.mark.parametrize("config", [TINY_64, TINY_35], ids=["sd3", "sd35"])
def test_transformer_from_diffusers_folder(tmp_path, config):
    ref = save_transformer(tmp_path, config)
    x, t, tokens, pooled = mmdit_inputs()
    with torch.no_grad():
        expected = ref(hidden_states=x, encoder_hidden_states=tokens, pooled_projections=pooled,
                       timestep=1000 * t).sample
        model, H = load_transformer(tmp_path)
        assert H is None
        assert_close_to_reference(model(x, t, tokens, pooled), expected, what="velocity (config.json)")
        # without config.json the config comes from the shapes
        os.remove(tmp_path / "transformer" / "config.json")
        model, _ = load_transformer(tmp_path)
        assert_close_to_reference(model(x, t, tokens, pooled), expected, what="velocity (inferred config)")


def test_inferred_config_by_hand(tmp_path):
    save_transformer(tmp_path, TINY_35)
    cfg = infer_mmdit_config(load_file(tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert (cfg.num_layers, cfg.num_attention_heads, cfg.attention_head_dim, cfg.pos_embed_max_size) == (3, 2, 8, 12)
    assert (cfg.qk_norm, cfg.dual_attention_layers, cfg.joint_attention_dim, cfg.pooled_projection_dim) == (
        "rms_norm", (0,), 12, 10)


def test_authors_student_and_distillcfg_layouts(tmp_path):
    ref = save_transformer(tmp_path, TINY)
    folder = tmp_path / "transformer"
    cfg_path = folder / "config.json"
    d = json.loads(cfg_path.read_text())
    d.update(guidance=False, txt_align_guidance=True)  # the authors' released student's config keys
    cfg_path.write_text(json.dumps(d))
    model, H = load_transformer(tmp_path)
    assert H is None
    # a DistillCFG checkpoint stores H as guidance_in.linear_{1,2}.*
    weights = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    g = torch.Generator().manual_seed(3)
    extra = {f"guidance_in.linear_{i}.{p}": torch.randn(shape, generator=g) for i, shape_w in ((1, (16, 256)), (2, (16, 16)))
             for p, shape in (("weight", shape_w), ("bias", (16,)))}
    save_file({**state, **extra}, weights)
    model, H = load_transformer(tmp_path)
    assert torch.equal(H.linear_1.weight, extra["guidance_in.linear_1.weight"])
    assert torch.equal(H.linear_2.bias, extra["guidance_in.linear_2.bias"])
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in model.state_dict().items())


def test_student_w_rounding_from_its_record(tmp_path):
    """A student folder without our record (the authors' release) reads 1000 w rounded in bf16, ours
    in float32 as recorded (a record from before the rounding was recorded means float32, the only
    one ours were distilled with), and an explicit w_rounding overrides both. The terms against
    diffusers' modules at 1000 w = 5000 (float32) and 4992 (bf16, by hand)."""
    diffusers = oracle("diffusers")
    model = random_mmdit()
    records = {"authors": None, "ours": {"student_kind": "teefusion", "w_rounding": "float32"},
               "older": {"student_kind": "teefusion"}}
    for name, record in records.items():
        loader.save_transformer(tmp_path / name, model,
                                extra_config=None if record is None else {loader.STUDENT_RECORD: record})
    rounding = {name: load_student(tmp_path / name).w_rounding for name in records}
    assert rounding == {"authors": "authors-bf16", "ours": "float32", "older": "float32"}
    assert load_student(tmp_path / "authors", w_rounding="float32").w_rounding == "float32"
    assert load_student(tmp_path / "ours", w_rounding="authors-bf16").w_rounding == "authors-bf16"
    # in float64, so that z^ minus Eq. 6's part leaves the small Eq. 7 term exact enough to compare
    ref = diffusers.SD3Transformer2DModel(**TINY).eval()
    ref.load_state_dict(model.state_dict())
    ref.double()
    tte, g = ref.time_text_embed, torch.Generator().manual_seed(0)
    c, u = (Text(torch.randn(1, 5, 12, generator=g).double(), torch.randn(1, 10, generator=g).double())
            for _ in range(2))
    t = torch.tensor([0.5])
    with torch.no_grad():
        for name, value in (("ours", 5000.0), ("authors", 4992.0)):
            expected = tte.timestep_embedder(tte.time_proj(torch.tensor([value])).double()) * tte.text_embedder(
                c.pooled - u.pooled) / 256.0
            student = load_student(tmp_path / name, dtype=torch.float64)
            term = student.z_hat(t, 5.0, c, u) - student.model.conditioning(t, c.pooled)
            assert_close_to_reference(term, expected, what=name)


def test_vae_from_diffusers_folder(tmp_path):
    diffusers = oracle("diffusers")
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                                  latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, use_quant_conv=False,
                                  use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609).eval()
    ref.save_pretrained(tmp_path / "vae")
    vae = load_vae(tmp_path)
    z = torch.randn(1, 4, 3, 5)
    with torch.no_grad():
        assert_close_to_reference(vae.decode(z), ref.decode(z / 1.5305 + 0.0609).sample, what="decoded image")


def test_text_encoders_from_transformers_folders(tmp_path):
    transformers = oracle("transformers")
    torch.manual_seed(0)
    clip = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        projection_dim=16, eos_token_id=99, bos_token_id=98, pad_token_id=99)).eval()
    clip.save_pretrained(tmp_path / "text_encoder")
    t5 = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu")).eval()
    t5.save_pretrained(tmp_path / "text_encoder_3", max_shard_size="40KB")  # sharded, with an index
    assert any(f.endswith(".index.json") for f in os.listdir(tmp_path / "text_encoder_3"))
    ids = torch.tensor([[98, 5, 7, 99] + [99] * 73])
    with torch.no_grad():
        hidden, pooled = load_text_encoder(tmp_path, "text_encoder")(ids)
        ref = clip(ids, output_hidden_states=True)
        assert_close_to_reference(pooled, ref.text_embeds, what="CLIP text_embeds")
        assert_close_to_reference(hidden, ref.hidden_states[-2], what="CLIP hidden_states[-2]")
        ids = torch.randint(0, 100, (2, 12))
        assert_close_to_reference(load_text_encoder(tmp_path, "text_encoder_3")(ids), t5(ids).last_hidden_state,
                                  what="T5 last_hidden_state")


def test_integer_data_for_a_float_parameter_is_refused(tmp_path):
    # a header declaring I32 over a float tensor: refused, naming the tensor, not cast to float
    save_transformer(tmp_path, TINY)
    weights = tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    state["proj_out.bias"] = state["proj_out.bias"].view(torch.int32)  # the same bytes, read as integers
    save_file(state, str(weights))
    with pytest.raises(ValueError, match=r"proj_out.bias is stored as torch.int32 but the model holds floating"):
        load_transformer(tmp_path)


def test_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="no transformer/ folder"):
        load_transformer(tmp_path)
    os.makedirs(tmp_path / "vae")
    with pytest.raises(FileNotFoundError, match="no .safetensors weights"):
        load_vae(tmp_path)
    save_transformer(tmp_path, TINY)
    folder = tmp_path / "transformer"
    d = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**d, "joint_attention_dim": 24}))
    with pytest.raises(ValueError, match=r"context_embedder.weight has shape \(16, 12\) in the checkpoint but \(16, 24\)"):
        load_transformer(tmp_path)
    (folder / "config.json").write_text(json.dumps({**d, "qk_norm": "rms_norm"}))
    with pytest.raises(ValueError, match="fits no known layout"):
        load_transformer(tmp_path)
    os.remove(folder / "config.json")  # 16 wide, heads of 8, no qk-norm: not inferable
    with pytest.raises(ValueError, match="cannot infer the head size"):
        load_transformer(tmp_path)
    (folder / "config.json").write_text(json.dumps(d))
    weights = folder / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated"):
        load_transformer(tmp_path)


def original_layout(D=16, heads=2, layers=3, C=4, p=2, joint=12, pooled=10, P=12, qk_norm=True, dual=(0,)):
    """A random MMDiT state dict in Stability's original single-file layout, names and shapes as
    their sd3.5 reference code (mmditx.py) defines them, written out here by hand."""
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g)
    s = {"pos_embed": r(1, P * P, D), "x_embedder.proj.weight": r(D, C, p, p), "x_embedder.proj.bias": r(D),
         "t_embedder.mlp.0.weight": r(D, 256), "t_embedder.mlp.0.bias": r(D), "t_embedder.mlp.2.weight": r(D, D),
         "t_embedder.mlp.2.bias": r(D), "y_embedder.mlp.0.weight": r(D, pooled), "y_embedder.mlp.0.bias": r(D),
         "y_embedder.mlp.2.weight": r(D, D), "y_embedder.mlp.2.bias": r(D), "context_embedder.weight": r(D, joint),
         "context_embedder.bias": r(D), "final_layer.linear.weight": r(p * p * C, D),
         "final_layer.linear.bias": r(p * p * C), "final_layer.adaLN_modulation.1.weight": r(2 * D, D),
         "final_layer.adaLN_modulation.1.bias": r(2 * D)}
    for i in range(layers):
        last = i == layers - 1
        for block in ("x_block", "context_block"):
            b = f"joint_blocks.{i}.{block}."
            attns = ["attn", "attn2"] if block == "x_block" and i in dual else ["attn"]
            for a in attns:
                s[b + f"{a}.qkv.weight"], s[b + f"{a}.qkv.bias"] = r(3 * D, D), r(3 * D)
                if not (block == "context_block" and last):
                    s[b + f"{a}.proj.weight"], s[b + f"{a}.proj.bias"] = r(D, D), r(D)
                if qk_norm:
                    s[b + f"{a}.ln_q.weight"], s[b + f"{a}.ln_k.weight"] = r(D // heads), r(D // heads)
            n = 2 if block == "context_block" and last else (9 if attns == ["attn", "attn2"] else 6)
            s[b + "adaLN_modulation.1.weight"], s[b + "adaLN_modulation.1.bias"] = r(n * D, D), r(n * D)
            if not (block == "context_block" and last):
                s[b + "mlp.fc1.weight"], s[b + "mlp.fc1.bias"] = r(4 * D, D), r(4 * D)
                s[b + "mlp.fc2.weight"], s[b + "mlp.fc2.bias"] = r(D, 4 * D), r(D)
    return {"model.diffusion_model." + k: v for k, v in s.items()}


# without qk-norm the loader infers SD3's head size 64, so that variant is 64 wide with one head
@pytest.mark.parametrize("D,heads,qk_norm,dual", [(64, 1, False, ()), (16, 2, True, (0,))], ids=["sd3", "sd35"])
def test_single_file_mapping_equals_diffusers_conversion(tmp_path, D, heads, qk_norm, dual):
    oracle("diffusers")
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
    original = original_layout(D=D, heads=heads, qk_norm=qk_norm, dual=dual)
    expected = convert_sd3_transformer_checkpoint_to_diffusers(dict(original))
    got = from_original(original)
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    # the same from a file that also holds other models' tensors, as Stability's files do
    save_file({**original, "text_encoders.clip_l.x": torch.zeros(1)}, tmp_path / "sd3.safetensors")
    model = load_single_file(tmp_path / "sd3.safetensors")
    assert model.config.qk_norm == ("rms_norm" if qk_norm else None) and model.config.dual_attention_layers == dual
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
