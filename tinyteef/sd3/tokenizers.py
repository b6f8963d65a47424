"""SD3's two kinds of text tokenizer, with the standard library only: CLIP's byte-level BPE
(`tokenizer/` for CLIP-L, `tokenizer_2/` for bigG) and T5's SentencePiece unigram (`tokenizer_3/`).

Both read the diffusers-layout files and give the ids of the Rust `tokenizers` pipelines that
diffusers loads there: transformers 5's `CLIPTokenizer` (4.x's `CLIPTokenizerFast`) and
`T5TokenizerFast`. Each step says what it matches and where it can differ.

Under transformers 4.x, SD3's model_index.json `CLIPTokenizer` was the slow Python tokenizer. It
differs from this file in three ways: with `ftfy` installed it runs `ftfy.fix_text` first (curly
quotes become straight: "it’s" gives "it" "'s", not "it" "’" "s"; full-width forms become ASCII);
without `ftfy` its BasicTokenizer drops control characters and makes each CJK ideograph a word
("東京" is two words, not one); and `str.lower` writes a word-final Σ as ς, not σ.

References: Sennrich et al. 2016 (BPE); Radford et al. 2019 (GPT-2 byte-level BPE) and 2021
(CLIP); Kudo 2018 (unigram language model); Kudo & Richardson 2018 (SentencePiece).
"""

import functools
import json
import re
import unicodedata
from pathlib import Path

import torch

from .charsmap import Charsmap

BOS, EOS = "<|startoftext|>", "<|endoftext|>"

def read_json(path, expected):
    """Parse a JSON file, or fail saying which file and what folder layout it belongs to."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected {expected}")
    return json.loads(path.read_text(encoding="utf-8"))


def special_splitter(specials):
    """A regex that finds special-token strings, longest first so the leftmost-longest one wins,
    as the `tokenizers` added-token matcher does ("(?!)", never matching, if there are none)."""
    return re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) or "(?!)")


def split_specials(text, splitter):
    """[(chunk, is_special)]: special tokens are cut out of the raw text before any normalisation
    (exact, case-sensitive matches) and the text between them is tokenised piece by piece."""
    out, pos = [], 0
    for m in splitter.finditer(text):
        out += [(text[pos:m.start()], False), (m.group(), True)]
        pos = m.end()
    return out + [(text[pos:], False)]


def pad_rows(rows, length, pad_id):
    """Right-pad lists of ids to `length` into a (B, length) LongTensor."""
    return torch.tensor([row + [pad_id] * (length - len(row)) for row in rows], dtype=torch.long)


# --- CLIP: byte-level BPE ---------------------------------------------------------------------
# The `tokenizers` regex engine's \s is Python's str.isspace() minus the four separators
# U+001C..U+001F, which it reads as punctuation (checked over every code point).
NOT_ONIG_SPACE = "\x1c\x1d\x1e\x1f"
CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


def bytes_to_unicode():
    """GPT-2's byte -> char table: printable bytes map to themselves, the other 68 (controls,
    space, 127-160, 173) to chr(256 + n) in order, so every byte string is a printable word."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    moved = [b for b in range(256) if b not in keep]
    table = {b: chr(b) for b in keep}
    table.update({b: chr(256 + n) for n, b in enumerate(moved)})
    return table


BYTE_TO_CHAR = bytes_to_unicode()


def clip_kind(c):
    r"""The class of c in CLIP's regex: " " whitespace, "L" letter, "N" number, "P" anything else.
    \p{L} and \p{N} are the general categories L* and N*, read here from unicodedata, so this
    agrees with the `regex` module and with the `tokenizers` engine on every character that
    Python's Unicode tables know (14.0 on Python 3.11; checked over every code point against
    `tokenizers`); only characters assigned in later Unicode versions can be classed differently."""
    if c.isspace() and c not in NOT_ONIG_SPACE:
        return " "
    cat = unicodedata.category(c)[0]
    return cat if cat in "LN" else "P"


def clip_normalize(text):
    """The fast tokenizer's normaliser: NFC, each whitespace run -> one space, lowercase.
    Lowercasing is per character (Rust's char::to_lowercase, which equals per-char str.lower on
    every code point): str.lower on the whole string would turn a word-final Σ into ς, not σ.
    No strip: the pre-tokeniser drops the spaces at the ends anyway."""
    text = unicodedata.normalize("NFC", text)
    text = "".join(" " if clip_kind(c) == " " else c for c in text)
    text = re.sub(" +", " ", text)
    return "".join(c.lower() for c in text)


def clip_pieces(text):
    r"""Split normalised text as CLIP's regex does, `re.findall` of
    <|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+,
    written as a scanner because Python's `re` has no \p{L} / \p{N}: at each position the
    alternatives are tried in that order, whitespace between pieces is dropped."""
    pieces, i = [], 0
    while i < len(text):
        kind = clip_kind(text[i])
        if kind == " ":
            i += 1
            continue
        literal = next((s for s in (BOS, EOS, *CONTRACTIONS) if text.startswith(s, i)), None)
        if literal in (BOS, EOS):
            # Only reachable from e.g. "<|ENDOFTEXT|>" (exact ones were cut out as special
            # tokens); the byte-level step's GPT-2 regex then splits it into three words.
            pieces += ["<|", literal[2:-2], "|>"]
            i += len(literal)
            continue
        j = i + (len(literal) if literal else 1)
        while not literal and kind != "N" and j < len(text) and clip_kind(text[j]) == kind:
            j += 1  # letters and punctuation run on; a number is one character
        pieces.append(text[i:j])
        i = j
    return pieces


def bpe(word, ranks):
    """Merge the pair of adjacent symbols with the lowest rank, everywhere, until no pair of
    `word` (a list of symbols) is in `ranks`."""
    while len(word) > 1:
        pair = min(zip(word, word[1:]), key=lambda p: ranks.get(p, float("inf")))
        if pair not in ranks:
            break
        merged, i = [], 0
        while i < len(word):
            if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
                merged.append(word[i] + word[i + 1])
                i += 2
            else:
                merged.append(word[i])
                i += 1
        word = merged
    return word


class CLIPTokenizer:
    """CLIP's tokenizer: [BOS] + at most max_length - 2 BPE tokens + [EOS], right-padded.

    SD3's tokenizer/ pads with <|endoftext|>, tokenizer_2/ with "!" (id 0). Like Hugging Face's,
    the pad token is a special token, so with "!" as pad a literal "!" in a prompt becomes id 0
    rather than the word "!</w>".
    """

    def __init__(self, vocab_json_path, merges_txt_path, pad_token=EOS, max_length=77, normalized=()):
        layout = "a CLIP tokenizer folder (tokenizer/ or tokenizer_2/) with vocab.json and merges.txt"
        self.vocab = read_json(vocab_json_path, layout)
        if not Path(merges_txt_path).is_file():
            raise FileNotFoundError(f"{merges_txt_path} not found: expected {layout}")
        lines = Path(merges_txt_path).read_text(encoding="utf-8").splitlines()
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.specials = {t: self.token_id(t) for t in (BOS, EOS, pad_token)}
        # Special tokens are found in the raw text, or, those marked "normalized" (SD3 marks
        # <|startoftext|> so), in the normalised text: "<|StartOfText|>" is then BOS too.
        self.normalized_specials = {clip_normalize(t): i for t, i in self.specials.items() if t in normalized}
        self.raw_splitter = special_splitter([t for t in self.specials if t not in normalized])
        self.normalized_splitter = special_splitter(self.normalized_specials)
        self.bos_id, self.eos_id, self.pad_id = (self.specials[t] for t in (BOS, EOS, pad_token))
        self.max_length = max_length
        self.cache = {}  # piece -> ids: prompts repeat words

    @classmethod
    def from_folder(cls, folder):
        """Read vocab.json and merges.txt, and from special_tokens_map.json / tokenizer_config.json
        where present (the latter wins): the pad token, model_max_length, and the flags of the
        special tokens in "added_tokens_decoder". Of those flags only "normalized" changes ids
        here; lstrip, rstrip and single_word are refused (SD3 sets none of them; "special" only
        matters to decoding). A legacy config without "added_tokens_decoder" matches all three
        special tokens in the raw text."""
        folder = Path(folder)
        config = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            if (folder / name).is_file():
                config.update(json.loads((folder / name).read_text(encoding="utf-8")))
        pad = config.get("pad_token") or EOS
        pad = pad["content"] if isinstance(pad, dict) else pad  # AddedToken written out as a dict
        added = list(config.get("added_tokens_decoder", {}).values())
        for token in added:
            stripped = any(token.get(flag) for flag in ("lstrip", "rstrip", "single_word"))
            if token["content"] not in (BOS, EOS, pad) or stripped:
                raise ValueError(f"{folder}/tokenizer_config.json: added token {token} is not supported "
                                 "(only SD3's: BOS, EOS and the pad token, without lstrip/rstrip/single_word)")
        normalized = {token["content"] for token in added if token.get("normalized")}
        max_length = int(config.get("model_max_length", 77))
        return cls(folder / "vocab.json", folder / "merges.txt", pad, max_length, normalized)

    def token_id(self, token):
        """The id of a vocabulary entry, or a clear error."""
        if token not in self.vocab:
            raise KeyError(f"{token!r} is not in vocab.json")
        return self.vocab[token]

    def encode_piece(self, piece):
        """One pre-token -> ids: UTF-8 bytes as GPT-2 chars, "</w>" on the last, BPE merges."""
        if piece not in self.cache:
            word = [BYTE_TO_CHAR[b] for b in piece.encode("utf-8")]
            word[-1] += "</w>"
            # A symbol missing from the vocabulary becomes the unknown token, <|endoftext|>.
            self.cache[piece] = [self.vocab.get(s, self.vocab[EOS]) for s in bpe(word, self.ranks)]
        return self.cache[piece]

    def encode(self, text):
        """Token ids of one text, without BOS, EOS or padding, and not truncated."""
        ids = []
        for chunk, special in split_specials(text, self.raw_splitter):
            if special:
                ids.append(self.specials[chunk])
                continue
            for part, special in split_specials(clip_normalize(chunk), self.normalized_splitter):
                if special:
                    ids.append(self.normalized_specials[part])
                else:
                    for piece in clip_pieces(part):
                        ids += self.encode_piece(piece)
        return ids

    def __call__(self, texts):
        """A text or list of B texts -> (B, max_length) ids; truncation keeps BOS and EOS."""
        texts = [texts] if isinstance(texts, str) else texts
        body = self.max_length - 2
        rows = [[self.bos_id] + self.encode(t)[:body] + [self.eos_id] for t in texts]
        return pad_rows(rows, self.max_length, self.pad_id)


# --- T5: SentencePiece unigram ----------------------------------------------------------------
UNK_PENALTY = 10.0  # an unknown character scores min(score) - 10, as in sentencepiece


def replace_step(spec):
    """A Replace normaliser: every match of a literal string or a regex -> `content`. The file's
    regexes (Oniguruma syntax in `tokenizers`) are read with Python's re: T5's " {2,}" and
    character classes mean the same in both."""
    pattern, content = spec["pattern"], spec["content"]
    if "String" in pattern:
        return lambda text: text.replace(pattern["String"], content)
    regex = re.compile(pattern["Regex"])
    return lambda text: regex.sub(lambda _: content, text)


def read_normalizer(spec):
    """tokenizer.json's "normalizer" as a function str -> str, step by step as the file says.

    SD3's tokenizer_3/ has Sequence[Precompiled(T5's nmt_nfkc charsmap), Replace(" {2,}", " ")]:
    the charsmap is applied by `Charsmap.normalize` (NFKC, 30 control characters deleted, odd
    spaces, ZWNJ and ZWJ -> " "), then runs of spaces become one. A file without a charsmap gets
    exactly its own steps (none if "normalizer" is null); the Unicode normal forms are Python's
    unicodedata, which can differ from `tokenizers` on characters newer than its Unicode version.
    """
    if spec is None:
        return lambda text: text
    kind = spec.get("type")
    if kind == "Sequence":
        steps = [read_normalizer(step) for step in spec["normalizers"]]
        return lambda text: functools.reduce(lambda t, step: step(t), steps, text)
    if kind == "Precompiled":
        return Charsmap.from_base64(spec["precompiled_charsmap"]).normalize
    if kind == "Replace":
        return replace_step(spec)
    if kind in ("NFC", "NFD", "NFKC", "NFKD"):
        return lambda text: unicodedata.normalize(kind, text)
    raise ValueError(f"tokenizer.json: normalizer {kind!r} is not supported here (Sequence, Precompiled, "
                     "Replace, NFC, NFD, NFKC, NFKD are): use SD3's tokenizer_3/tokenizer.json")


def metaspace(text):
    """Metaspace(replacement "▁", prepend always, split): spaces -> "▁", "▁" put in front unless
    already there, then one word per "▁" ("▁a▁b" -> "▁a", "▁b")."""
    text = text.replace(" ", "▁")
    text = text if text.startswith("▁") else "▁" + text
    return re.findall("▁[^▁]*", text)


class T5Tokenizer:
    """T5's tokenizer: unigram pieces of each word + </s>, right-padded with <pad> to max_length
    (diffusers' max_sequence_length, 256 for SD3); truncation keeps </s>.

    The text goes through the file's normaliser (`read_normalizer`), then Metaspace. Leading and
    trailing spaces are kept: a trailing space gives a final "▁" token. This is the `tokenizers`
    library on SD3's file, i.e. transformers 4's T5TokenizerFast, which diffusers' SD3 pipeline
    used; the sentencepiece library, and transformers 5's T5Tokenizer, drop the trailing space
    (huggingface/tokenizers issue 1250 on this mismatch). Prompts without one agree in all.
    """

    def __init__(self, tokenizer_json_path, max_length=256):
        spec = read_json(tokenizer_json_path, "tokenizer_3/ of an SD3 checkpoint with tokenizer.json "
                                              "(spiece.model alone cannot be read without sentencepiece)")
        self.normalize = read_normalizer(spec.get("normalizer"))
        model = spec["model"]
        if model.get("type") != "Unigram":
            raise ValueError(f"{tokenizer_json_path}: expected a Unigram model, got {model.get('type')}")
        vocab = model["vocab"]
        self.pieces = {piece: (i, score) for i, (piece, score) in enumerate(vocab)}
        self.unk_id = model["unk_id"]
        self.unk_score = min(score for _, score in vocab) - UNK_PENALTY
        self.longest = max(len(piece) for piece in self.pieces)
        self.specials = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
        self.splitter = special_splitter(self.specials)
        self.eos_id, self.pad_id = self.pieces["</s>"][0], self.pieces["<pad>"][0]
        self.max_length = max_length

    @classmethod
    def from_folder(cls, folder, max_length=256):
        """Read folder/tokenizer.json."""
        return cls(Path(folder) / "tokenizer.json", max_length)

    def segment(self, word):
        """Viterbi: the segmentation of `word` into pieces with the largest summed score.

        best[j] = (score, start, id) of the best path covering word[:j]. A character that starts
        no one-character piece may also be taken as an unknown at unk_score, so a path always
        exists. On a tie the path found first (last piece starting earliest) stays, as in HF.
        Consecutive unknowns are fused into one <unk>.
        """
        n = len(word)
        best = [(0.0, 0, None)] + [None] * n
        for i in range(n):
            score_i = best[i][0]
            single = False
            for j in range(i + 1, min(n, i + self.longest) + 1):
                hit = self.pieces.get(word[i:j])
                if hit is None:
                    continue
                single |= j == i + 1
                if best[j] is None or score_i + hit[1] > best[j][0]:
                    best[j] = (score_i + hit[1], i, hit[0])
            if not single and (best[i + 1] is None or score_i + self.unk_score > best[i + 1][0]):
                best[i + 1] = (score_i + self.unk_score, i, self.unk_id)
        ids, j = [], n
        while j > 0:
            _, j, token = best[j]
            if not (token == self.unk_id and ids and ids[-1] == self.unk_id):
                ids.append(token)
        return ids[::-1]

    def encode(self, text):
        """Piece ids of one text, without </s> or padding, and not truncated."""
        ids = []
        for chunk, special in split_specials(text, self.splitter):
            if special:
                ids.append(self.specials[chunk])
                continue
            chunk = self.normalize(chunk)
            if chunk:  # nothing (or only deleted characters) gives no "▁"
                for word in metaspace(chunk):
                    ids += self.segment(word)
        return ids

    def __call__(self, texts):
        """A text or list of B texts -> (B, max_length) ids; truncation keeps </s>."""
        texts = [texts] if isinstance(texts, str) else texts
        rows = [self.encode(t)[: self.max_length - 1] + [self.eos_id] for t in texts]
        return pad_rows(rows, self.max_length, self.pad_id)
