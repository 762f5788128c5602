"""The reference side of the tokenizer tests: transformers' CLIPTokenizer built from sdlab's merges
file, the generator of `sdlab/data/clip_unicode.txt`, SD1.5's training-time text cleaning written
out again from its description, and a seeded corpus of hostile and real text.

`python tests/clip_reference.py` regenerates `sdlab/data/clip_unicode.txt` from the installed
reference (`tokenizers`); `test_tokenizer.py` checks that the committed file is exactly what this
gives.
"""

from __future__ import annotations

import gettext
import gzip
import random
import sys
import unicodedata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sdlab.tokenizer import DEFAULT_MERGES_PATH, UNICODE_TABLES_PATH

CODE_POINTS = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]  # every Unicode scalar value


# ----------------------------------------------------------------------------- the reference


def openai_vocab_and_merges():
    """The vocabulary exactly as OpenAI's CLIP `SimpleTokenizer` builds it (written out
    again here on purpose, so it checks sdlab's construction instead of reusing it)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    byte_chars = [chr(c) for c in cs]
    lines = gzip.decompress(DEFAULT_MERGES_PATH.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def reference_tokenizer():
    """transformers' `CLIPTokenizer` (the Rust `tokenizers` backend diffusers uses for SD1.5)."""
    from transformers import CLIPTokenizer

    # transformers 5 ignores `vocab_file=`: pass the vocabulary and merges themselves.
    vocab, merges = openai_vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def training_time_clean(text: str) -> str:
    """SD1.5's training-time cleaning, from transformers 4.19's slow `CLIPTokenizer._tokenize`
    (ldm's `FrozenCLIPEmbedder` used that tokenizer with ftfy installed):
    `whitespace_clean(ftfy.fix_text(text)).lower()`, where `whitespace_clean` is
    `regex.sub(r"\\s+", " ", text).strip()`. OpenAI's own `basic_clean` also applies
    `html.unescape` twice; transformers never did."""
    import ftfy
    import regex

    return regex.sub(r"\s+", " ", ftfy.fix_text(text)).strip().lower()


def openai_clean(text: str) -> str:
    """OpenAI's CLIP `simple_tokenizer`: `whitespace_clean(basic_clean(text)).lower()`, where
    `basic_clean` is `html.unescape(html.unescape(ftfy.fix_text(text))).strip()`."""
    import html

    import ftfy
    import regex

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


# ------------------------------------------------------------- sdlab/data/clip_unicode.txt


def _runs(code_points) -> list[tuple[int, int]]:
    """Sorted code points -> inclusive ranges of consecutive ones."""
    runs: list[list[int]] = []
    for c in sorted(code_points):
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return [tuple(r) for r in runs]


def _class_members(pattern: str) -> set[int]:
    """The code points the reference's regex engine (Oniguruma) puts in `pattern`."""
    from tokenizers import Regex, pre_tokenizers

    split = pre_tokenizers.Split(Regex(pattern), behavior="removed", invert=True)
    members: set[int] = set()
    for piece, (start, end) in split.pre_tokenize_str("".join(map(chr, CODE_POINTS))):
        members.update(CODE_POINTS[start:end])
    return members


def _each(normalizer, pieces: list[str]) -> list[str]:
    """`normalizer` on each piece, in one call: pieces joined by NUL, a starter that no
    normalizer changes or combines, so it keeps them apart."""
    out = normalizer.normalize_str("\0" + "\0".join(pieces)).split("\0")[1:]
    assert len(out) == len(pieces)
    return out


def _per_character(normalizer) -> dict[int, str]:
    """What one of the reference's normalizers does to each code point on its own."""
    chars = [chr(c) for c in CODE_POINTS if c]
    return {ord(ch): out for ch, out in zip(chars, _each(normalizer, chars)) if out != ch}


def _non_starters(nfd: dict[int, str]) -> set[int]:
    """Code points with a non-zero canonical combining class in the reference's normalizer.

    Canonical ordering swaps two marks when the first has the higher non-zero class. U+0334 has
    the lowest class (1) and U+0345 the highest (240), so a mark `m` that does not decompose has a
    non-zero class exactly when `U+0345 m` or `m U+0334` gets reordered."""
    from tokenizers import normalizers

    marks = [chr(c) for c in CODE_POINTS if c and c not in nfd]
    after_240 = _each(normalizers.NFD(), ["\u0345" + m for m in marks])
    before_1 = _each(normalizers.NFD(), [m + "\u0334" for m in marks])
    return {ord(m) for m, a, b in zip(marks, after_240, before_1) if a != "\u0345" + m or b != m + "\u0334"}


def _check_combining_classes(classes: dict[int, int]) -> None:
    """The class values come from Python's `unicodedata` (classes never change once assigned);
    here the reference's own canonical ordering confirms every pair of them."""
    from tokenizers import normalizers

    pairs = [(a, b) for a in sorted(classes) for b in sorted(classes)]
    results = _each(normalizers.NFD(), [chr(a) + chr(b) for a, b in pairs])
    for (a, b), result in zip(pairs, results):
        assert (result != chr(a) + chr(b)) == (classes[a] > classes[b]), (hex(a), hex(b))


def _hex(*code_points: int) -> str:
    return " ".join(f"{c:04X}" for c in code_points)


def unicode_tables_text() -> str:
    """The text of `sdlab/data/clip_unicode.txt`, measured on the installed reference."""
    import tokenizers
    from tokenizers import normalizers

    nfd = _per_character(normalizers.NFD())
    nfc = _per_character(normalizers.NFC())
    lower = _per_character(normalizers.Lowercase())
    classes = {c: unicodedata.combining(chr(c)) for c in _non_starters(nfd)}
    assert all(classes.values()), "a non-starter unknown to this Python's unicodedata"
    _check_combining_classes(classes)
    hangul = range(0xAC00, 0xD7A4)
    decompositions = {c: d for c, d in nfd.items() if c not in hangul}
    compositions = []
    for c, d in sorted(decompositions.items()):
        if c not in nfc:  # a primary composite: NFC gives it back
            first, second = (int(x, 16) for x in unicodedata.decomposition(chr(c)).split())
            assert nfc.get(first, chr(first)) + chr(second) != chr(c) and len(nfc.get(first, chr(first))) == 1
            assert normalizers.NFC().normalize_str(chr(first) + chr(second)) == chr(c), hex(c)
            compositions.append((first, second, c))
    for first, last in ((0xAC00, 0xAC00), (0xD7A3, 0xD7A3)):
        assert nfd[first] == _hangul_reference(first) and nfd[last] == _hangul_reference(last)

    lines = [
        "# The Unicode data of transformers' CLIPTokenizer, measured on the reference itself",
        f"# (Rust tokenizers {tokenizers.__version__}) by `python tests/clip_reference.py`. Do not edit.",
        "# Code points in hexadecimal. Sections:",
        "#   @letter, @number, @space  ranges 'first last' of \\p{L}, \\p{N} and \\s in the pre-tokenizer",
        "#                             and whitespace regexes (Oniguruma; Unicode 16.0)",
        "#   @lower                    'code point -> lower case' (Rust char::to_lowercase; Unicode 17.0)",
        "#   @ccc                      ranges 'first last class': non-zero canonical combining classes",
        "#                             (unicode-normalization-alignments; Unicode 9.0)",
        "#   @decompose                'code point -> full canonical decomposition' (Hangul syllables",
        "#                             are decomposed by formula)",
        "#   @compose                  'first second -> primary composite'",
    ]
    for name, pattern in (("letter", r"[\p{L}]+"), ("number", r"[\p{N}]+"), ("space", r"\s+")):
        lines.append(f"@{name}")
        lines += [_hex(a, b) for a, b in _runs(_class_members(pattern))]
    lines.append("@lower")
    lines += [_hex(c, *map(ord, s)) for c, s in sorted(lower.items())]
    lines.append("@ccc")
    for value in sorted(set(classes.values())):
        lines += [f"{_hex(a, b)} {value}" for a, b in _runs(c for c in classes if classes[c] == value)]
    lines.append("@decompose")
    lines += [_hex(c, *map(ord, d)) for c, d in sorted(decompositions.items())]
    lines.append("@compose")
    lines += [_hex(*triple) for triple in compositions]
    return "\n".join(lines) + "\n"


def _hangul_reference(c: int) -> str:
    s = c - 0xAC00
    lead, vowel, trail = 0x1100 + s // 588, 0x1161 + (s % 588) // 28, 0x11A7 + s % 28
    return chr(lead) + chr(vowel) + (chr(trail) if trail != 0x11A7 else "")


# ------------------------------------------------------------------------------ the corpus


def real_lines() -> list[str]:
    """Real text in ~80 languages: every message of the gettext catalogues installed with the
    book's tools (Sphinx and its themes, tornado), split into lines, deduplicated, sorted."""
    import sphinx

    site = Path(sphinx.__file__).resolve().parents[1]
    lines = set()
    for mo in sorted(site.glob("*/**/LC_MESSAGES/*.mo")):
        with open(mo, "rb") as handle:
            catalog = gettext.GNUTranslations(handle)._catalog
        for key, value in catalog.items():
            for text in (key[0] if isinstance(key, tuple) else key, value):
                lines.update(line for line in text.split("\n") if line.strip())
    return sorted(lines)


def _is_letter_or_number_class(c: int) -> str:
    return unicodedata.category(chr(c))[0] if unicodedata.category(chr(c))[0] in "LN" else "-"


_POOLS: dict[str, list[int]] = {}


def pools() -> dict[str, list[int]]:
    """Code points worth a closer look, from this Python's `unicodedata` and the `regex`
    package (whatever their Unicode versions): both only choose inputs, never expected ids."""
    if not _POOLS:
        import regex

        text = "".join(map(chr, CODE_POINTS))
        in_regex = {name: {m.start() for m in regex.finditer(pattern, text)}
                    for name, pattern in (("L", r"\p{L}"), ("N", r"\p{N}"), ("assigned", r"\P{Cn}"))}
        changed = []  # classified differently by Python's tables and regex's: new in one of them
        for i, c in enumerate(CODE_POINTS):
            ours = _is_letter_or_number_class(c)
            theirs = "L" if i in in_regex["L"] else "N" if i in in_regex["N"] else "-"
            if ours != theirs or (i in in_regex["assigned"]) != (unicodedata.category(chr(c)) != "Cn"):
                changed.append(c)
        marks = [c for c in CODE_POINTS if unicodedata.combining(chr(c)) or unicodedata.category(chr(c))[0] == "M"]
        cased = [c for c in CODE_POINTS if chr(c).lower() != chr(c) or chr(c).upper() != chr(c)]
        decomposable = [c for c in CODE_POINTS if unicodedata.decomposition(chr(c))]
        seconds = sorted({int(d.split()[-1], 16) for d in map(unicodedata.decomposition, map(chr, decomposable))
                          if d and not d.startswith("<")})
        spaces = [c for c in range(0x3001) if chr(c).isspace() or unicodedata.category(chr(c)) in ("Zs", "Zl", "Zp")]
        spaces += [0x180E, 0x200B, 0x200C, 0x200D, 0x2060, 0xFEFF, 0x1C, 0x1D, 0x1E, 0x1F]
        controls = [*range(0x20), *range(0x7F, 0xA0), 0xAD, *range(0x200B, 0x2010), *range(0x2028, 0x202F),
                    *range(0x2060, 0x2070), 0xFEFF, 0xFFF9, 0xFFFA, 0xFFFB, 0xFFFC, 0xFFFD, 0xFFFE, 0xFFFF,
                    *range(0xE0000, 0xE0080), *range(0xFE00, 0xFE10), 0x10FFFE, 0x10FFFF]
        private = [*range(0xE000, 0xF900), *range(0xF0000, 0xF0100), *range(0x10FF00, 0x110000)]
        _POOLS.update(changed=changed, marks=marks, cased=cased, decomposable=decomposable, seconds=seconds,
                      spaces=spaces, controls=controls, private=private)
    return _POOLS


EMOJI = ["🐱", "🎩", "😎", "👍🏽", "👨\u200d👩\u200d👧\u200d👦", "🇫🇷", "🇯🇵", "1\ufe0f\u20e3", "❤\ufe0f",
         "🏴\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f", "🧑🏿\u200d🚀", "👩\u200d❤\ufe0f\u200d💋\u200d👨",
         "\U0001faef", "\U0001fae8", "🫠", "©\ufe0e", "☺\ufe0f"]
WORDS = ["a", "photo", "of", "cat", "it's", "DON'T", "we're", "I'M", "you'll", "he'd", "they've", "'s", "'T",
         "<|endoftext|>", "<|startoftext|>", "<|EndOfText|>", "<|", "|>", "2024", "3.14", "c++", "café",
         "naïve", "Straße", "ΟΔΥΣΣΕΥΣ", "İstanbul", "ǅemal", "ﬁne", "ＡＢＣ", "ｶﾀｶﾅ", "“quoted”", "don’t",
         "&amp;", "&lt;3", "...", "—", "½", "①", "Ⅻ", "٣", "𝐁𝐨𝐥𝐝", "x²", "ᾼ", "ﬀ", "ΐ", "ŉ"]
WHITESPACE_CHARS = " \t\n\r\x0b\x0c\x85\xa0\u1680\u2000\u2007\u200a\u2028\u2029\u202f\u205f\u3000"


def _random_code_point(rng: random.Random) -> int:
    plane = rng.randrange(17)
    while True:
        c = plane * 0x10000 + rng.randrange(0x10000)
        if not 0xD800 <= c <= 0xDFFF:
            return c


def _chars(rng: random.Random, pool: list[int], k: int) -> str:
    return "".join(chr(rng.choice(pool)) for _ in range(k))


def _line(rng: random.Random, family: str, real: list[str]) -> str:
    p = pools()
    def word() -> str:
        return rng.choice(WORDS)

    if family == "real":
        return rng.choice(real)
    if family in ("NFC", "NFD", "NFKC", "NFKD"):
        return unicodedata.normalize(family, rng.choice(real))
    if family == "cased":
        line = rng.choice(real)
        return rng.choice([line.upper(), line.title(), line.swapcase(), _chars(rng, p["cased"], rng.randint(1, 12))])
    if family == "planes":
        return "".join(chr(_random_code_point(rng)) if rng.random() < 0.7 else rng.choice("ab +'1.")
                       for _ in range(rng.randint(1, 30)))
    if family == "changed":  # next to letters, digits and punctuation, like '+\U0003f58f'
        return "".join(rng.choice(["", "a", "+", "1", " ", "'", "é", "Z"]) + _chars(rng, p["changed"], rng.randint(1, 3))
                       for _ in range(rng.randint(1, 8)))
    if family == "marks":
        parts = []
        for _ in range(rng.randint(1, 6)):
            base = rng.choice(["a", "e", "o", "A", "s", "ᄀ", "가", "각", "\u0915", "\u0b47", " ", "", chr(rng.choice(p["decomposable"]))])
            tail = [rng.choice(p["marks"] + p["seconds"] + [0x1161, 0x1175, 0x11A8, 0x11C2]) for _ in range(rng.randint(0, 5))]
            parts.append(base + "".join(map(chr, tail)))
        return "".join(parts)
    if family == "hangul":
        jamo = [*range(0x1100, 0x1113), *range(0x1161, 0x1176), *range(0x11A7, 0x11C3), *range(0xAC00, 0xAC40)]
        return _chars(rng, jamo, rng.randint(1, 12))
    if family == "controls":
        return "".join(word() + _chars(rng, p["controls"], rng.randint(0, 3)) for _ in range(rng.randint(1, 6)))
    if family == "spaces":
        return "".join(word() + _chars(rng, p["spaces"], rng.randint(0, 4)) for _ in range(rng.randint(1, 8)))
    if family == "emoji":
        return "".join(rng.choice(EMOJI + [" ", "a", "\u200d", "\ufe0f", "\U0001f3fb"]) for _ in range(rng.randint(1, 10)))
    if family == "private":
        return "".join(rng.choice(["", "x", " ", "'"]) + _chars(rng, p["private"], rng.randint(1, 3)) for _ in range(rng.randint(1, 5)))
    if family == "words":
        return "".join(word() + rng.choice(["", " ", "  ", "'", "’", ",", "\t", rng.choice(WHITESPACE_CHARS)])
                       for _ in range(rng.randint(1, 12)))
    if family == "mixed":
        line = list(rng.choice(real))
        for _ in range(rng.randint(1, 4)):
            pool = p[rng.choice(["changed", "marks", "cased", "spaces", "controls", "seconds"])]
            line.insert(rng.randrange(len(line) + 1), chr(rng.choice(pool)))
        return "".join(line)
    if family == "long":
        return " ".join(rng.choice(real) for _ in range(rng.randint(20, 60)))
    raise ValueError(family)


FAMILIES = ["real", "real", "real", "NFC", "NFD", "NFKC", "NFKD", "cased", "planes", "planes", "changed",
            "changed", "marks", "marks", "hangul", "controls", "spaces", "emoji", "private", "words", "mixed",
            "mixed", "long"]


def corpus(n: int, seed: int = 0) -> list[str]:
    """`n` seeded lines: real text, its NFD/NFKD/... forms, random code points of every plane
    (unassigned and private use included), combining marks, Hangul jamo, controls, whitespace
    runs, emoji sequences, contractions, special tokens and long lines. No lone surrogates."""
    rng = random.Random(seed)
    real = real_lines()
    return [_line(rng, FAMILIES[i % len(FAMILIES)], real) for i in range(n)]


if __name__ == "__main__":
    UNICODE_TABLES_PATH.write_text(unicode_tables_text(), encoding="utf-8")
    print(f"wrote {UNICODE_TABLES_PATH}")
