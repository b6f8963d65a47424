"""tinyteef.sd3.tokenizers against the Hugging Face tokenizers SD3 loads, on files built here.

CLIP: transformers' `CLIPTokenizer` (in transformers 5 the Rust-backed tokenizer, the pipeline of
4.x's CLIPTokenizerFast), loaded with from_pretrained from the same vocab.json / merges.txt /
configs, called as diffusers' SD3 pipeline calls it (padding="max_length", max_length=77,
truncation=True).

T5: `tokenizers.Tokenizer.from_file` on the same tokenizer.json. SD3's file normalises with a
precompiled nmt_nfkc charsmap (a binary trie that cannot be built here), so the test file spells
out nmt_nfkc with plain normalisers: Replace(nmt spaces -> " "), NFKC (the full-width tilde
protected around it), Replace(" {2,}" -> " "); then Metaspace, Unigram and "$A </s>" as SD3's.
"""

import json
import random
import re
from collections import Counter

import pytest

from conftest import oracle
from tinyteef.sd3.tokenizers import BYTE_TO_CHAR, NMT_SPACES, CLIPTokenizer, T5Tokenizer

# ---------------------------------------------------------------------------------------------
# CLIP

CORPUS = """a photo of a cat. a photo of a dog! a painting of a cat on the beach, at sunset.
it's the cat's toy; they're here and we've seen what i'm doing, you'll see, he'd go.
1024 px, 3.5 steps, 28 steps at 1024 x 1024. café naïve façade — ok? "quoted" (brackets)
the the the photo photo cat cat dog dog"""
N_MERGES = 80


def learn_merges(corpus, n):
    """A minimal BPE trainer, independent of the code under test: words (contractions, letter
    runs, single digits, other runs) as UTF-8 bytes in GPT-2 chars with "</w>" on the last; the
    most frequent adjacent pair is merged, n times (ties: the smallest pair)."""
    words = Counter()
    for word in re.findall(r"'(?:s|t|re|ve|m|ll|d)|[^\W\d_]+|\d|[^\w\s]+|_+", corpus.lower()):
        chars = [BYTE_TO_CHAR[b] for b in word.encode("utf-8")]
        chars[-1] += "</w>"
        words[tuple(chars)] += 1
    merges = []
    for _ in range(n):
        pairs = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        best = max(pairs, key=lambda p: (pairs[p], [-ord(c) for c in p[0] + p[1]]))
        merges.append(best)
        merged = Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return merges


def write_clip_folder(path, pad_token):
    """vocab.json / merges.txt laid out as CLIP's: the 256 byte chars, their "</w>" forms, one
    entry per merge, then <|startoftext|> and <|endoftext|>; configs as in SD3's folders."""
    path.mkdir()
    merges = learn_merges(CORPUS, N_MERGES)
    chars = list(BYTE_TO_CHAR.values())
    tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(set(tokens)) == len(tokens)
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (path / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>", "pad_token": pad_token}
    (path / "special_tokens_map.json").write_text(json.dumps(special))
    config = {**special, "model_max_length": 77, "do_lower_case": True,
              "tokenizer_class": "CLIPTokenizer"}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


CLIP_TEXTS = [
    "a photo of a cat",
    "a cat, a dog!",
    "1024 px, 3.5",
    "café naïve 東京 — ok",
    "   a  photo\tof\n\na   cat   ",
    "A PHOTO Of A Cat",
    "it's the cat's toy, they're 'quoted' and we'VE done",
    "ΟΔΟΣ ΣΑΣ",  # final sigma: per-character lowercase
    "e\u0301 cafe\u0301",  # NFC composes
    "x\x1cy\u00a0z\u3000w",  # U+001C is punctuation to the regex, U+00A0 / U+3000 whitespace
    "a <|endoftext|> b<|startoftext|>c <|ENDOFTEXT|>! !<|endoftext|>",
    "",
    "a photo of a cat " * 30,  # more than 75 tokens: truncated, EOS kept
]


@pytest.fixture(scope="module", params=["<|endoftext|>", "!"], ids=["tokenizer", "tokenizer_2"])
def clip_pair(request, tmp_path_factory):
    """(ours, Hugging Face's) from one folder: SD3's tokenizer/ (pad <|endoftext|>) or
    tokenizer_2/ (pad "!", id 0)."""
    transformers = oracle("transformers")
    folder = write_clip_folder(tmp_path_factory.mktemp("clip") / "tok", request.param)
    return CLIPTokenizer.from_folder(folder), transformers.CLIPTokenizer.from_pretrained(folder)


def hf_clip_ids(hf, texts):
    """Ids as diffusers' SD3 pipeline asks for them."""
    return hf(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def test_clip_matches_transformers(clip_pair):
    """Every case text, one batch, equal ids; the long prompt keeps BOS ... EOS."""
    ours, hf = clip_pair
    ids = ours(CLIP_TEXTS)
    assert ids.shape == (len(CLIP_TEXTS), 77)
    assert ids.tolist() == hf_clip_ids(hf, CLIP_TEXTS).tolist()
    for text in CLIP_TEXTS:  # untruncated too
        assert ours.encode(text) == hf(text, add_special_tokens=False).input_ids, text
    long = ids[-1]
    assert long[0] == ours.bos_id and long[-1] == ours.eos_id and len(ours.encode(CLIP_TEXTS[-1])) > 75


def test_clip_pad_token(clip_pair):
    """tokenizer/ pads with <|endoftext|>; tokenizer_2/ with "!" = id 0, and a literal "!"
    becomes id 0 too (a special token), not "!</w>"."""
    ours, hf = clip_pair
    row = ours(["a cat!"])[0].tolist()
    if hf.pad_token == "!":
        assert ours.pad_id == 0 and row[:5] == [ours.bos_id, ours.vocab["a</w>"], ours.vocab["cat</w>"], 0, ours.eos_id]
    else:
        assert ours.pad_id == ours.eos_id
    assert row[5:] == [ours.pad_id] * 72 and row == hf_clip_ids(hf, ["a cat!"])[0].tolist()


def test_clip_fuzz(clip_pair):
    """Random texts over letters, digits, punctuation, apostrophes, accents, CJK, odd spaces and
    special-token strings."""
    ours, hf = clip_pair
    atoms = ["a", "cat", "Photo", "of", " ", "  ", "\t", "\n", "'s", "'", "'re", "'LL", "1", "024",
             "3.5", ",", "!", "?!", "—", "é", "e\u0301", "ß", "Σ", "東京", "\x1c", "\u00a0", "\u200b",
             "<|endoftext|>", "<|startoftext|>", "<|EndOfText|>", "<|", "|>", "😀", "\u0000", "x²"]
    rng = random.Random(0)
    texts = ["".join(rng.choice(atoms) for _ in range(rng.randint(1, 30))) for _ in range(300)]
    assert ours(texts).tolist() == hf_clip_ids(hf, texts).tolist()


def test_clip_missing_file(tmp_path):
    """An empty folder names the missing file."""
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        CLIPTokenizer.from_folder(tmp_path)


# ---------------------------------------------------------------------------------------------
# T5

T5_PIECES = {  # piece: score (log-probability); several words have competing segmentations
    "▁": -2.0, "▁a": -3.0, "▁photo": -6.0, "▁ph": -7.0, "oto": -7.5, "▁of": -4.0, "▁cat": -6.5,
    "▁ca": -7.0, "t": -5.0, "▁the": -3.5, "▁th": -6.0, "e": -4.5, "s": -4.6, "▁cats": -12.0,
    "▁dog": -7.0, "▁do": -5.5, "g": -6.0, "a": -5.5, "c": -6.1, "h": -6.2, "o": -5.1, "p": -6.3,
    "f": -6.4, "d": -6.5, "n": -5.2, "i": -5.3, "l": -5.4, "w": -6.6, "r": -5.6, "x": -7.7,
    "▁1": -6.0, "1": -6.5, "0": -6.0, "2": -6.2, "4": -6.3, "24": -8.0, ",": -4.0, ".": -4.2,
    "!": -5.0, "~": -8.0, "～": -8.5, "é": -9.0, "▁café": -10.0, "A": -8.0, "P": -9.0, "▁P": -8.5,
    "▁A": -7.5, "▁full": -9.5, "▁width": -9.6, "u": -7.0, "m": -7.1, "ti": -8.8, "▁ti": -9.9,
    # "▁ab" ties with "▁a" "b" (-4.0): the path found first wins
    "b": -1.0, "▁ab": -4.0,
    # "▁kqzz": "▁kqz" "z" (-25) beats "▁k" <unk> "zz" (-31) only because <unk> costs min - 10
    "▁k": -0.5, "zz": -0.5, "z": -5.0, "▁kqz": -20.0,
}


def write_t5_json(path, tokenizers):
    """A tokenizer.json in the shape of SD3's tokenizer_3/ (ids 0-2 <pad> </s> <unk>, Unigram,
    Metaspace with a prepended "▁", "$A </s>", two <extra_id_*> tokens), nmt_nfkc spelled out."""
    Regex, normalizers = tokenizers.Regex, tokenizers.normalizers
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + list(T5_PIECES.items())
    vocab += [("<extra_id_1>", 0.0), ("<extra_id_0>", 0.0)]
    tok = tokenizers.Tokenizer(tokenizers.models.Unigram(vocab, unk_id=2, byte_fallback=False))
    spaces = "".join(chr(c) for c in NMT_SPACES)
    tok.normalizer = normalizers.Sequence([
        normalizers.Replace(Regex("[" + spaces + "]"), " "),
        normalizers.Replace("～", "\ue000"),  # nmt_nfkc leaves the full-width tilde alone
        normalizers.NFKC(),
        normalizers.Replace("\ue000", "～"),
        normalizers.Replace(Regex(" {2,}"), " "),
    ])
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.post_processor = tokenizers.processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.add_special_tokens(["<pad>", "</s>", "<unk>", "<extra_id_1>", "<extra_id_0>"])
    tok.save(str(path))
    return path


T5_TEXTS = [
    "a photo of a cat",
    "the cats of the dog, 1024!",
    "A Photo of the  cat",  # no lowercasing: "▁A", "▁P" "h" "oto"
    "café ☃☃ cat ☃ Q",  # unknown characters, consecutive ones fused into one <unk>
    "  leading and   repeated   spaces  ",  # a trailing space gives a final "▁"
    "tabs\tand\nnew\r\nlines\u200bzero\u2581width",  # nmt_nfkc spaces
    "ｆｕｌｌ ｗｉｄｔｈ ① ～ ~ ﬁ",  # NFKC, except the full-width tilde
    "a</s>b <extra_id_0> <unk><pad>",  # added tokens are cut out first
    "",
    "ab kqzz",
    "a photo of the dog " * 80,  # more than 256 tokens: truncated, </s> kept
]


@pytest.fixture(scope="module")
def t5_pair(tmp_path_factory):
    """(ours, `tokenizers`' Tokenizer) on one tokenizer.json; the oracle pads and truncates to
    256 as diffusers asks T5TokenizerFast to."""
    tokenizers = oracle("tokenizers")
    folder = tmp_path_factory.mktemp("t5")
    path = write_t5_json(folder / "tokenizer.json", tokenizers)
    hf = tokenizers.Tokenizer.from_file(str(path))
    hf.enable_truncation(256)
    hf.enable_padding(length=256, pad_id=0, pad_token="<pad>")
    return T5Tokenizer.from_folder(folder), hf


def test_t5_matches_tokenizers(t5_pair):
    ours, hf = t5_pair
    ids = ours(T5_TEXTS)
    assert ids.shape == (len(T5_TEXTS), 256)
    assert ids.tolist() == [e.ids for e in hf.encode_batch(T5_TEXTS)]
    assert ours.encode("café ☃☃ cat ☃ Q").count(2) == 3  # ☃☃ fused, ☃, Q
    assert ids[-1, -1] == ours.eos_id and ids[T5_TEXTS.index("")].tolist() == [1] + [0] * 255


def test_t5_fuzz(t5_pair):
    """Random texts over pieces, unknowns, odd spaces, NFKC-changed forms and added tokens."""
    ours, hf = t5_pair
    atoms = ["a", "photo", "of", "cat", "cats", "the", "dog", "ti", " ", "  ", "\t", "\n", "\u3000",
             "\u200b", "▁", "1", "024", ",", "!", "é", "e\u0301", "☃", "Q", "東", "ｆ", "～", "~",
             "①", "A", "P", "</s>", "<unk>", "<extra_id_0>", "<pad>", "\x0b"]
    rng = random.Random(0)
    texts = ["".join(rng.choice(atoms) for _ in range(rng.randint(1, 30))) for _ in range(300)]
    assert ours(texts).tolist() == [e.ids for e in hf.encode_batch(texts)]


def test_t5_missing_file(tmp_path):
    """An empty folder names the missing file."""
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        T5Tokenizer.from_folder(tmp_path)
