"""SD3's text encoders (sd3/clip.py, sd3/t5.py) against transformers, on tiny random models.

Each parity test builds a random transformers model (eager attention: an explicit softmax, not
the SDPA call our CLIP uses), loads its state dict into ours with strict=True and compares the
outputs SD3 reads, in float32, within 1e-4 of the reference's scale.
"""

import pytest
import torch
from conftest import assert_close_to_reference, oracle

from tinyteef.sd3.clip import CLIPConfig, CLIPTextEncoder
from tinyteef.sd3.t5 import T5Config, T5Encoder, relative_position_bucket

BOS, EOS, VOCAB = 98, 99, 100  # tiny vocabulary; EOS is the largest id, as 49407 is in CLIP's

CLIP_TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                 max_position_embeddings=77, projection_dim=16, eos_token_id=EOS)
CLIP_L_LIKE = dict(CLIP_TINY, num_hidden_layers=3, hidden_act="quick_gelu")
CLIP_G_LIKE = dict(CLIP_TINY, num_hidden_layers=4, hidden_act="gelu")

T5_TINY = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_heads=4,
               relative_attention_num_buckets=32, relative_attention_max_distance=128,
               feed_forward_proj="gated-gelu")


def clip_ids():
    """Three rows of 77 with BOS first and the first EOS at a different place in each: padded
    with EOS (CLIP-L's tokenizer), padded with id 0 (bigG's "!"), and EOS only at the end."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, BOS, (3, 77), generator=g)
    ids[:, 0] = BOS
    ids[0, 6:] = EOS  # first EOS at 6, then EOS pads
    ids[1, 13] = EOS  # first EOS at 13, then 0 pads
    ids[1, 14:] = 0
    ids[2, 76] = EOS  # a full row
    return ids


def hf_clip(cfg, seed=0):
    """A random transformers CLIPTextModelWithProjection and its (eval, float32) state."""
    transformers = oracle("transformers")
    torch.manual_seed(seed)
    hf_cfg = transformers.CLIPTextConfig(**cfg, bos_token_id=BOS, pad_token_id=0, attn_implementation="eager")
    return transformers.CLIPTextModelWithProjection(hf_cfg).eval()


def ours_from(hf, cls, cfg_cls, cfg):
    model = cls(cfg_cls(**cfg)).eval()
    model.load_state_dict(hf.state_dict(), strict=True)
    return model


@pytest.mark.parametrize("cfg", [CLIP_L_LIKE, CLIP_G_LIKE], ids=["L-like", "G-like"])
def test_clip_matches_transformers(cfg):
    """hidden_states[-2] (no final norm), hidden_states[-3] for clip_skip=1, and text_embeds
    (projection of the final-normed state at the first EOS) equal transformers'."""
    hf = hf_clip(cfg)
    ours = ours_from(hf, CLIPTextEncoder, CLIPConfig, cfg)
    ids = clip_ids()
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True)
        hidden, pooled = ours(ids)
        hidden_skip1, pooled_skip1 = ours(ids, clip_skip=1)
    assert len(ref.hidden_states) == cfg["num_hidden_layers"] + 1
    assert_close_to_reference(hidden, ref.hidden_states[-2], what="hidden_states[-2]")
    assert_close_to_reference(hidden_skip1, ref.hidden_states[-3], what="hidden_states[-3] (clip_skip=1)")
    assert_close_to_reference(pooled, ref.text_embeds, what="text_embeds")
    assert_close_to_reference(pooled_skip1, ref.text_embeds, what="text_embeds (clip_skip=1)")
    # The pads differ between rows 0 and 1 only after their EOS; with the causal mask the
    # pooled vector must not see them: recompute row 1 with EOS pads instead of 0 pads.
    ids_eos_pads = ids.clone()
    ids_eos_pads[1, 14:] = EOS
    with torch.no_grad():
        hidden_2, pooled_2 = ours(ids_eos_pads)
    torch.testing.assert_close(pooled_2, pooled)
    assert not torch.allclose(hidden_2[1, 14:], hidden[1, 14:])  # the 77-token features do see pads


def test_clip_legacy_eos_config_pools_like_transformers():
    """Published CLIP config.json files carry eos_token_id 2; transformers then pools at
    argmax(ids) (the first largest id, EOS); ours follows the same rule."""
    cfg = dict(CLIP_L_LIKE, eos_token_id=2)
    hf = hf_clip(cfg)
    ours = ours_from(hf, CLIPTextEncoder, CLIPConfig, cfg)
    ids = clip_ids()
    with torch.no_grad():
        assert_close_to_reference(ours(ids)[1], hf(ids).text_embeds, what="text_embeds")


def test_clip_loads_saved_files(tmp_path):
    """The file save_pretrained writes loads strict=True, and so does an old-style state dict
    that still stores position_ids (transformers < 4.31 kept that buffer persistent)."""
    safetensors_torch = oracle("safetensors.torch")
    hf = hf_clip(CLIP_G_LIKE)
    hf.save_pretrained(tmp_path)
    state = safetensors_torch.load_file(str(tmp_path / "model.safetensors"))
    ours = CLIPTextEncoder(CLIPConfig(**CLIP_G_LIKE))
    ours.load_state_dict(state, strict=True)
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    ours.load_state_dict(state, strict=True)


def test_clip_rejects_rows_without_eos():
    model = CLIPTextEncoder(CLIPConfig(**CLIP_L_LIKE))
    with pytest.raises(ValueError, match="EOS"):
        model(torch.ones(1, 77, dtype=torch.long))


def hf_t5(seed=0):
    """A random transformers T5EncoderModel with a bias table 5x its init, so that a wrong
    bucket would move the output well past the tolerance."""
    transformers = oracle("transformers")
    torch.manual_seed(seed)
    hf = transformers.T5EncoderModel(transformers.T5Config(
        **T5_TINY, dropout_rate=0.0, attn_implementation="eager")).eval()
    with torch.no_grad():
        hf.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.mul_(5.0)
    return hf


def test_t5_matches_transformers():
    """last_hidden_state at length 40 (relative positions up to 39: exact and log buckets), with
    no mask and with a mask that drops the last positions of one row."""
    hf = hf_t5()
    ours = ours_from(hf, T5Encoder, T5Config, T5_TINY)
    ids = torch.randint(2, VOCAB, (2, 40), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[0, 31:] = 0
    with torch.no_grad():
        for m, name in ((None, "no mask"), (mask, "mask")):
            ref = hf(input_ids=ids, attention_mask=m).last_hidden_state
            assert_close_to_reference(ours(ids, attention_mask=m), ref, what=f"last_hidden_state ({name})")
        masked = ours(ids, attention_mask=mask)
        unmasked = ours(ids)
    # the mask must matter for the row it covers and leave the other row alone
    assert not torch.allclose(masked[0], unmasked[0], atol=1e-3)
    torch.testing.assert_close(masked[1], unmasked[1])


def test_t5_loads_saved_files(tmp_path):
    """save_pretrained stores the tied embedding once (shared.weight); ours still loads strict."""
    safetensors_torch = oracle("safetensors.torch")
    hf = hf_t5()
    hf.save_pretrained(tmp_path)
    state = safetensors_torch.load_file(str(tmp_path / "model.safetensors"))
    assert "encoder.embed_tokens.weight" not in state  # the case the load hook exists for
    ours = T5Encoder(T5Config(**T5_TINY))
    ours.load_state_dict(state, strict=True)
    assert ours.encoder.embed_tokens.weight is ours.shared.weight
    assert torch.equal(ours.shared.weight, hf.shared.weight)  # a copy of the saved bytes


def test_relative_position_bucket_by_hand():
    """Buckets from T5's relative-position bucket formula, worked by hand (32 buckets, max distance 128):
    bucket = 16 [rel > 0] + (|rel| if |rel| < 8 else min(15, 8 + int(log(|rel|/8) / log 16 * 8))).
    |rel| 12: 8 ln1.5/ln16 = 1.17 -> 9;  20: 8 ln2.5/ln16 = 2.64 -> 10;  30: 8 ln3.75/ln16 = 3.81
    -> 11;  60: 8 ln7.5/ln16 = 5.81 -> 13;  100: 8 ln12.5/ln16 = 7.29 -> 15;  128 and 1000: >= 8
    -> capped at 15. (Values that land exactly on an integer, e.g. 16 and 64, are left out: their
    bucket depends on float32 rounding.)"""
    expected = {0: 0, -1: 1, 1: 17, -7: 7, 7: 23, -8: 8, 8: 24, -12: 9, 12: 25, -20: 10, 30: 27,
                -60: 13, -100: 15, 100: 31, -128: 15, 128: 31, -1000: 15, 1000: 31}
    rel = torch.tensor(list(expected))
    assert relative_position_bucket(rel).tolist() == list(expected.values())


def test_relative_position_bucket_matches_transformers():
    """Every relative position in [-300, 300], boundary cases included, as transformers buckets it."""
    transformers = oracle("transformers")
    rel = torch.arange(-300, 301)
    ref = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
        rel, bidirectional=True, num_buckets=32, max_distance=128)
    assert torch.equal(relative_position_bucket(rel), ref)
