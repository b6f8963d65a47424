"""SentencePiece's precompiled charsmap: the normaliser table inside T5's tokenizer.json (the
`precompiled_charsmap` of its "Precompiled" normaliser, SentencePiece's nmt_nfkc for T5), applied
as the Rust `tokenizers` library applies it (its Precompiled normaliser over the spm_precompiled
crate), with the standard library only.

The table is a set of rewrite rules, key -> replacement, over UTF-8 strings: NFKC's (a character,
or a decomposed sequence such as "A" + U+0301, to its NFKC form) and nmt_nfkc's own (30 control
characters deleted; tabs, newlines, zero-width spaces, ZWNJ, ZWJ ... to a space).

References: Kudo & Richardson 2018 (SentencePiece); Aoe 1989 (double-array tries), Yata et al.
2007 and Darts-clone (their compact form); Unicode Standard Annex #29 (grapheme clusters).
"""

import base64
import struct
import unicodedata

# --- Grapheme clusters (UAX #29, extended), as far as the charsmap can tell them apart --------
# Python's unicodedata has no Grapheme_Cluster_Break property: the classes that matter are rebuilt
# from the general category and the short lists of UAX #29 (Unicode 16, as `tokenizers`).
PREPEND = {*range(0x600, 0x606), 0x6DD, 0x70F, 0x890, 0x891, 0x8E2, 0xD4E, 0x110BD, 0x110CD, 0x111C2,
           0x111C3, 0x113D1, 0x1193F, 0x11941, *range(0x11A84, 0x11A8A), 0x11D46, 0x11F02}
# Spacing marks (Mc) that UAX #29 leaves out of SpacingMark: Myanmar, Tai Tham, Tai Viet, Ahom.
NOT_SPACING_MARK = {0x102B, 0x102C, 0x1038, *range(0x1062, 0x1065), *range(0x1067, 0x106E), 0x1083,
                    *range(0x1087, 0x108D), 0x108F, *range(0x109A, 0x109D), 0x1A61, 0x1A63, 0x1A64,
                    0xAA7B, 0xAA7D, 0x11720, 0x11721}
# Extend, ZWJ or SpacingMark without being a mark: Thai/Lao SARA AM, ZWNJ, ZWJ, half-width kana
# voicing marks, emoji skin tones, tag characters.
NOT_MARK_EXTEND = {0xE33, 0xEB3, 0x200C, 0x200D, 0xFF9E, 0xFF9F, *range(0x1F3FB, 0x1F400),
                   *range(0xE0020, 0xE0080)}
# Format characters (Cf) that are not Control: ZWNJ, ZWJ, Prepend, tags.
NOT_CONTROL = {0x200C, 0x200D, *PREPEND, *range(0xE0020, 0xE0080)}
# Unassigned here yet Control: default-ignorable reserved code points, and the Egyptian format
# controls new in Unicode 15 (Cf from Python 3.12 on).
UNASSIGNED_CONTROL = (range(0x2065, 0x2066), range(0xFFF0, 0xFFF9), range(0x13439, 0x13440),
                      range(0xE0000, 0xE1000))


def is_control(c):
    """Grapheme_Cluster_Break Control, CR or LF: a cluster of its own (rules GB4, GB5)."""
    category = unicodedata.category(c)
    if category == "Cn":
        return any(ord(c) in r for r in UNASSIGNED_CONTROL)
    return category in ("Cc", "Zl", "Zp") or (category == "Cf" and ord(c) not in NOT_CONTROL)


def continues_cluster(c):
    """Grapheme_Cluster_Break Extend, ZWJ or SpacingMark: c joins what is before it (GB9, GB9a)."""
    if unicodedata.category(c) in ("Mn", "Me", "Mc"):
        return ord(c) not in NOT_SPACING_MARK
    return ord(c) in NOT_MARK_EXTEND


def grapheme_clusters(text):
    """Split text into extended grapheme clusters by rules GB3-GB5, GB9-GB9b and GB999 of UAX #29.

    Left out, as they need property tables Python lacks: GB6-GB8 (Hangul syllables), GB9c (Indic
    conjuncts), GB11 (emoji ZWJ sequences), GB12-GB13 (flag pairs). Their clusters have 6 UTF-8
    bytes or more, which `Charsmap.normalize` maps character by character anyway, and so it maps
    the pieces this split makes of them, unless such a piece is shorter than 6 bytes and starts
    with a key. Checked against `tokenizers` on T5's charsmap (every code point; every key followed
    by every joining character; keys after joining contexts; random mixes), the output differs
    only there: for a key that continues such a cluster, followed by a 2-byte combining mark
    (U+0300-U+07FF): the nukta letters U+0958-U+095F, U+09DC, U+09DD, U+09DF, U+0B5C, U+0B5D after a
    virama ("क्" + U+0958 + U+0301), ™ ‼ ⁉ ℹ Ⓜ ㊗ ㊙ after an emoji and a ZWJ; and for marks newer
    than Python's Unicode tables (14.0 in Python 3.11; `tokenizers` has 16.0) after a key
    ("²" + U+0897).
    """
    start = 0
    for i in range(1, len(text)):
        prev, c = text[i - 1], text[i]
        if prev == "\r" or is_control(prev) or is_control(c):
            joined = prev == "\r" and c == "\n"  # GB3 (CR LF), GB4, GB5
        else:
            joined = continues_cluster(c) or ord(prev) in PREPEND  # GB9, GB9a, GB9b
        if not joined:
            yield text[start:i]
            start = i
    if text:
        yield text[start:]


# --- The table: a Darts-clone double-array trie over UTF-8 bytes ------------------------------
# Layout: uint32 LE trie size in bytes | the trie, uint32 LE units | the replacements, each
# NUL-terminated, that the trie's values index into. A unit packs, from the low bits: the label
# (bits 0-7: the byte on the edge into this node; bit 31 too, so that a leaf unit never matches a
# byte), has_leaf (bit 8: a key ends here, its value in the unit at offset ^ 0), an offset
# (bits 10-30, shifted left by 8 when bit 9 is set) to XOR with the node position to get to its
# children, which sit at child_base ^ byte. A leaf unit holds the value in bits 0-30.


def unit_offset(unit):
    """Where a unit's children (or, for a key's end, its leaf) are: XOR this with its position."""
    return (unit >> 10) << ((unit & (1 << 9)) >> 6)


class Charsmap:
    """A precompiled charsmap: `transform` looks a string up, `normalize` applies the table."""

    def __init__(self, blob):
        trie_bytes = struct.unpack_from("<I", blob)[0] if len(blob) >= 4 else -1
        if trie_bytes < 0 or trie_bytes % 4 or 4 + trie_bytes > len(blob):
            raise ValueError("precompiled_charsmap is not a SentencePiece charsmap (uint32 trie size, "
                             "trie, strings): re-export tokenizer.json with the `tokenizers` library")
        self.units = struct.unpack_from(f"<{trie_bytes // 4}I", blob, 4)
        self.strings = blob[4 + trie_bytes:]

    @classmethod
    def from_base64(cls, text):
        """From tokenizer.json's "precompiled_charsmap" field."""
        return cls(base64.b64decode(text))

    def first_prefix_value(self, key):
        """Common-prefix search of the trie along the bytes `key`, stopped at the first key found,
        i.e. the value of the shortest key that is a prefix of `key` (None if none is).
        Like Darts-clone's, the search stops at a NUL byte (no key contains one)."""
        units = self.units
        node = unit_offset(units[0])  # the root's children
        for byte in key:
            if byte == 0:
                return None
            node ^= byte
            if node >= len(units) or units[node] & (1 << 31 | 0xFF) != byte:
                return None  # no edge labelled `byte` here
            unit = units[node]
            node ^= unit_offset(unit)
            if unit >> 8 & 1:  # has_leaf: a key ends with this byte
                return units[node] & 0x7FFFFFFF
        return None

    def transform(self, chunk):
        """The replacement of the shortest key that `chunk` starts with, for the WHOLE chunk
        (what follows that key in the chunk is dropped, as spm_precompiled's `transform` does);
        None if no key is a prefix of it. A replacement may be "" (a deleted character)."""
        index = self.first_prefix_value(chunk.encode("utf-8"))
        if index is None:
            return None
        return self.strings[index:self.strings.index(b"\0", index)].decode("utf-8")

    def normalize(self, text):
        """The Precompiled normaliser of `tokenizers`: each grapheme cluster shorter than 6 UTF-8
        bytes is replaced whole by `transform` if some key is a prefix of it; otherwise (or if
        none is) each of its characters is replaced by its own `transform`, or kept.

        So a short cluster whose first character is a key loses its other characters ("²" +
        U+0301 gives "2"), and "A" + U+0302 + U+0300 gives "Â", the key "A" + U+0302 being found
        before the longer "A" + U+0302 + U+0300 -> "Ầ". This is not SentencePiece's own
        normaliser (a longest match at each character), but it is what T5TokenizerFast, which
        diffusers' SD3 pipeline uses, feeds T5.
        """
        out = []
        for cluster in grapheme_clusters(text):
            whole = self.transform(cluster) if len(cluster.encode("utf-8")) < 6 else None
            if whole is not None:
                out.append(whole)
            else:
                for c in cluster:
                    single = self.transform(c)
                    out.append(c if single is None else single)
        return "".join(out)
