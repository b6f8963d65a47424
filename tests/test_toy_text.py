"""toy/text.py: the tokenizer by hand, the encoder's SD3-shaped outputs, and the prompt bank."""

import torch

from toy.data import ToyData
from toy.text import BOS, EOS, PAD, UNK, PromptBank, TextEncoder, Tokenizer


def test_tokenizer_by_hand():
    tok = Tokenizer(["a", "red", "circle"], length=5)
    # ids: <pad> 0, <bos> 1, <eos> 2, <unk> 3, then a 4, red 5, circle 6
    assert tok(["A red circle", "", "a blue circle"]).tolist() == [
        [BOS, 4, 5, 6, EOS], [BOS, EOS, PAD, PAD, PAD], [BOS, 4, UNK, 6, EOS]]
    assert tok(["a red red red circle"])[0].tolist() == [BOS, 4, 5, 5, EOS]  # truncation keeps EOS


def test_encoder_outputs_and_padding():
    torch.manual_seed(0)
    tok = Tokenizer(["a", "red", "circle"], length=6)
    enc = TextEncoder(len(tok), 6, width=16, layers=1, heads=2, pooled_dim=8).eval()
    ids = tok(["a red circle", "circle"])
    c = enc(ids)
    assert c.tokens.shape == (2, 6, 16) and c.pooled.shape == (2, 8)
    assert c.tokens[0, 5].eq(0).all() and c.tokens[1, 3:].eq(0).all()  # pads are zero
    # pads are masked out of attention: changing the pad embedding changes no other output
    with torch.no_grad():
        enc.embed.weight[PAD] += 1.0
    c2 = enc(ids)
    assert torch.allclose(c2.tokens, c.tokens, atol=1e-6) and torch.allclose(c2.pooled, c.pooled, atol=1e-6)
    # the pooled vector is read at the EOS position: the projection of the final state there
    h = enc.norm(enc.layers(enc.embed(ids) + enc.pos, src_key_padding_mask=ids == PAD))
    assert torch.allclose(c.pooled[1], enc.proj(h[1, 2]), atol=1e-6)


def test_prompt_bank_matches_direct_tokenisation():
    data = ToyData("t", [("colour", ["red", "blue"]), ("shape", ["circle", "square", "triangle"])],
                   ["a {colour} {shape}", "{shape} in {colour}"],
                   torch.zeros(1, 3, 32, 32, dtype=torch.uint8), torch.zeros(1, 2, dtype=torch.long),
                   torch.zeros(1, 3, 32, 32, dtype=torch.uint8), torch.zeros(1, 2, dtype=torch.long))
    tok = Tokenizer(data.vocabulary(), 6)
    bank = PromptBank(data, tok)
    y = torch.tensor([[1, 2], [0, 0], [1, 0]])
    g = torch.Generator().manual_seed(0)
    ids = bank.sample(y, g)
    pick = torch.randint(2, (3,), generator=torch.Generator().manual_seed(0)).tolist()
    by_hand = {(1, 2): ["a blue triangle", "triangle in blue"], (0, 0): ["a red circle", "circle in red"],
               (1, 0): ["a blue circle", "circle in blue"]}
    expected = tok([by_hand[tuple(row)][k] for row, k in zip(y.tolist(), pick)])
    assert torch.equal(ids, expected)
    assert bank.empty.tolist() == [[BOS, EOS, PAD, PAD, PAD, PAD]]
