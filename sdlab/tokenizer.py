"""The CLIP tokenizer: from a prompt to 77 integers, with byte-level BPE.

Stable Diffusion 1.5 never sees your prompt as text. The CLIP text encoder reads a
sequence of exactly **77 integer ids** drawn from a vocabulary of **49,408 tokens**. This
module turns text into those ids, from scratch, in four steps:

1. **Normalize** the text: Unicode NFC, runs of whitespace become one space, lower case.
2. **Pre-tokenize**: a regular expression cuts the text into *words*: runs of letters,
   single digits, runs of punctuation, and the English endings `'s 't 're 've 'm 'll 'd`.
   Whitespace is thrown away.
3. **Byte-level BPE**: each word is written as UTF-8 bytes, each byte shown as one
   printable character, and the last character gets the end-of-word marker `</w>`. Then
   the *merges* learned by OpenAI glue neighbouring pieces together, best-ranked pair
   first, until no known pair is left. Each final piece is one token of the vocabulary.
4. **Frame**: add `<|startoftext|>` (id 49406) before and `<|endoftext|>` (id 49407) after,
   cut at 77 ids, and pad with `<|endoftext|>` up to 77, as SD1.5's tokenizer does.

Why bytes? Any string, emoji and Chinese included, is a sequence of bytes, and all 256
bytes are in the vocabulary. So no text is ever "unknown": a rare word simply costs more
tokens.

The merges file `data/bpe_simple_vocab_16e6.txt.gz` is the one OpenAI shipped with CLIP
(MIT licence). The ids this module gives are the ids of `transformers.CLIPTokenizer`
(version 5), the tokenizer `diffusers` uses for SD1.5, on **every** string; the tests
check this on tens of thousands of lines, real and hostile.

**Which Unicode?** Steps 1 and 2 ask Unicode questions (is this a letter? its lower
case? its NFC form?), and the answers change from one Unicode version to the next. The
reference answers them with the tables compiled into the Rust `tokenizers` library:
`\\p{L}`, `\\p{N}` and `\\s` of its regex engine (Oniguruma, Unicode 16.0), Rust's
`char::to_lowercase` (Unicode 17.0) and an NFC of Unicode 9.0. sdlab reads the same answers
from `data/clip_unicode.txt`, measured on the reference once (`tests/clip_reference.py`
writes it, a test checks it), so its ids depend neither on the `regex` package nor on the
Python version.

**Training-time cleaning (`clean=`).** SD1.5 was trained with transformers 4.19's slow
tokenizer, which first ran `ftfy.fix_text`, then collapsed whitespace and lower-cased the
whole string. That changes the ids of curly quotes and apostrophes (a phone's smart
punctuation), ligatures, fullwidth letters, HTML entities and a final `Σ` (`ς`).
`CLIPTokenizer(clean="ftfy")` does that cleaning before step 1 (it needs `pip install
ftfy`); `clean="openai"` is OpenAI's CLIP `basic_clean`, which also unescapes HTML twice.
The default is **no cleaning**, the tokenizer diffusers and every SD1.5 pipeline use at
inference, so sdlab's images equal diffusers' for the same prompt.

```python
from sdlab.tokenizer import load_tokenizer

tok = load_tokenizer()
tok.tokenize("a photo of a cat")  # ['a</w>', 'photo</w>', 'of</w>', 'a</w>', 'cat</w>']
tok.encode("a photo of a cat")    # [320, 1125, 539, 320, 2368]
tok(["a photo of a cat"], padding="max_length", max_length=77, truncation=True).input_ids
load_tokenizer(clean="ftfy").tokenize("don’t")  # ["don't</w>"]; without cleaning 3 tokens
```
"""

from __future__ import annotations

import functools
import gzip
import heapq
import html
import json
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from collections.abc import Set as AbstractSet
from itertools import pairwise
from pathlib import Path
from typing import NamedTuple

from .errors import ArgumentError

DEFAULT_MERGES_PATH = Path(__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"
UNICODE_TABLES_PATH = Path(__file__).parent / "data" / "clip_unicode.txt"

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
END_OF_WORD = "</w>"
MODEL_MAX_LENGTH = 77  # positions of the CLIP text encoder
N_MERGES = 49152 - 256 - 2  # CLIP keeps only the first 48,894 merges of the file
SHOWN_DROPPED = 200  # at most this many dropped tokens are shown in the truncation warning
CACHE_SIZE = 100_000  # words kept in a tokenizer's BPE cache before it starts afresh
SPECIAL_TOKENS = re.compile(r"(<\|startoftext\|>|<\|endoftext\|>)")
SURROGATE = re.compile("[\ud800-\udfff]")
HANGUL_FIRST, HANGUL_LAST = 0xAC00, 0xD7A3  # the precomposed Hangul syllables


# ------------------------------------------------------------------ the Unicode tables


class UnicodeData(NamedTuple):
    """What steps 1 and 2 need, built from `data/clip_unicode.txt` (see `unicode_data`)."""

    word: re.Pattern  # the pre-tokenizer (step 2)
    whitespace: re.Pattern  # a run of white space
    lower: dict[int, str]  # for str.translate: code point -> its lower case
    ccc: dict[str, int]  # non-zero canonical combining classes
    decompose: dict[str, str]  # full canonical decompositions (not Hangul)
    compose: dict[tuple[str, str], str]  # pairs -> primary composite
    nfc_sensitive: re.Pattern  # a stretch of text NFC might change (with the character before)


def read_unicode_tables(path: str | Path = UNICODE_TABLES_PATH) -> dict[str, list[list[int]]]:
    """`data/clip_unicode.txt` as {section: rows of code points}; lines are hexadecimal
    numbers, sections start with `@name` (`@letter`, `@number`, `@space`, `@lower`, `@ccc`,
    `@decompose`, `@compose`; the header of the file says what each row means)."""
    sections: dict[str, list[list[int]]] = {}
    rows: list[list[int]] = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.startswith("@"):
            rows = sections.setdefault(line[1:], [])
        elif line and not line.startswith("#"):
            rows.append([int(field, 16) for field in line.split()])
    return sections


def char_class(ranges: Iterable[Iterable[int]]) -> str:
    """Inclusive code point ranges -> the inside of a `re` character class (`\\U...` escapes,
    so no character is special and no Unicode property of Python's `re` is involved)."""
    return "".join(f"\\U{first:08X}-\\U{last:08X}" for first, last in ranges)


@functools.lru_cache(maxsize=1)
def unicode_data() -> UnicodeData:
    """Build the pre-tokenizer, the lower-case table and the NFC tables from the shipped file.

    The pre-tokenizer is transformers' (and OpenAI's) pattern, with `\\p{L}`, `\\p{N}`, `\\s`
    spelled out as the ranges of the file:
    `<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[L]+|[N]|[^ S L N]+`.
    Alternatives are tried left to right, so "it's" gives "it" and "'s", and "'sun" gives "'s"
    and "un" (a quirk of CLIP, kept for identical ids). Each digit is a word of its own:
    "2024" is four tokens.
    """
    t = read_unicode_tables()
    letter, number, space = (char_class(t[name]) for name in ("letter", "number", "space"))
    word = re.compile(rf"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[{letter}]+|[{number}]"
                      rf"|[^{space}{letter}{number}]+")
    ccc = {chr(c): value for first, last, value in t["ccc"] for c in range(first, last + 1)}
    decompose = {chr(c): "".join(map(chr, parts)) for c, *parts in t["decompose"]}
    compose = {(chr(a), chr(b)): chr(c) for a, b, c in t["compose"]}
    # A character is NFC-sensitive when NFC may change it or what is before it: a non-starter,
    # a character that takes part in a composition as the second one (Hangul vowels and final
    # consonants included), or one that NFC does not leave alone. Anything else is a starter
    # that stays as it is, so NFC can be done stretch by stretch.
    seconds = {b for _, b in compose} | set(map(chr, range(0x1161, 0x1176))) | set(map(chr, range(0x11A8, 0x11C3)))
    unstable = {c for c, d in decompose.items() if compose.get((d[0], d[1:2])) != c or d[0] in seconds or d[0] in ccc}
    sensitive = sorted(map(ord, set(ccc) | seconds | unstable))
    runs = _ranges(sensitive)
    return UnicodeData(word=word, whitespace=re.compile(f"[{space}]+"),
                       lower={c: "".join(map(chr, to)) for c, *to in t["lower"]},
                       ccc=ccc, decompose=decompose, compose=compose,
                       nfc_sensitive=re.compile(f"(?s).?[{char_class(runs)}]+"))


def _ranges(sorted_code_points: list[int]) -> list[tuple[int, int]]:
    runs: list[list[int]] = []
    for c in sorted_code_points:
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return [(a, b) for a, b in runs]


# ------------------------------------------------------------------ step 1: normalize


def nfc(text: str) -> str:
    """Unicode NFC with the reference's tables (Unicode 9.0): canonical decomposition,
    canonical ordering of combining marks, canonical composition (UAX #15).

    Only the stretches that NFC may change are worked on (most text has none), each with the
    character before it, which is where a composition can start."""
    if text.isascii():
        return text
    data = unicode_data()
    return data.nfc_sensitive.sub(lambda m: _nfc_stretch(m.group(), data), text)


def _decompose(text: str, data: UnicodeData) -> list[str]:
    """Full canonical decomposition, then marks sorted by class within each run of them."""
    chars: list[str] = []
    for ch in text:
        code = ord(ch)
        if HANGUL_FIRST <= code <= HANGUL_LAST:  # syllable = 0xAC00 + (lead * 21 + vowel) * 28 + trail
            s = code - HANGUL_FIRST
            chars += [chr(0x1100 + s // 588), chr(0x1161 + s % 588 // 28)] + ([chr(0x11A7 + s % 28)] if s % 28 else [])
        else:
            chars += data.decompose.get(ch, ch)
    i = 0
    while i < len(chars):  # canonical ordering: a stable sort of each run of non-starters
        j = i
        while j < len(chars) and chars[j] in data.ccc:
            j += 1
        if j - i > 1:
            chars[i:j] = sorted(chars[i:j], key=data.ccc.__getitem__)
        i = j + 1
    return chars


def _compose_pair(first: str, second: str, data: UnicodeData) -> str | None:
    """The primary composite of two characters, Hangul by formula, or None."""
    a, b = ord(first), ord(second)
    if 0x1100 <= a <= 0x1112 and 0x1161 <= b <= 0x1175:  # lead + vowel
        return chr(HANGUL_FIRST + ((a - 0x1100) * 21 + b - 0x1161) * 28)
    if HANGUL_FIRST <= a <= HANGUL_LAST and (a - HANGUL_FIRST) % 28 == 0 and 0x11A8 <= b <= 0x11C2:  # + trail
        return chr(a + b - 0x11A7)
    return data.compose.get((first, second))


def _nfc_stretch(text: str, data: UnicodeData) -> str:
    """NFC of a short stretch: decompose, then compose each character with the last starter
    unless a mark in between has a class of 0 or >= its own (it is "blocked")."""
    out: list[str] = []
    starter = -1  # index in `out` of the last starter
    last_class = None  # class of the last character kept after that starter; None: none kept
    for ch in _decompose(text, data):
        cls = data.ccc.get(ch, 0)
        if starter >= 0 and (last_class is None or 0 < last_class < cls):
            composite = _compose_pair(out[starter], ch, data)
            if composite is not None:
                out[starter] = composite
                continue
        if cls == 0:
            starter, last_class = len(out), None
        else:
            last_class = cls
        out.append(ch)
    return "".join(out)


def lowercase(text: str) -> str:
    """Lower case **one character at a time**, as Rust's `char::to_lowercase` (so a final "Σ"
    becomes "σ", not "ς"; "İ" becomes "i" + U+0307)."""
    return text.lower() if text.isascii() else text.translate(unicode_data().lower)


def normalize(text: str) -> str:
    """Step 1, exactly as `transformers.CLIPTokenizer` (v5) normalizes text.

    - Unicode NFC, so "e" + combining accent and the single character "é" are the same;
    - every run of white space (spaces, tabs, newlines, no-break spaces...) becomes " ";
      the control characters \\x1c-\\x1f are not white space here (Python's `str.split`
      would say they are);
    - lower case, one character at a time (see `lowercase`).

    Unlike OpenAI's original code there is no `ftfy` repair and no HTML unescaping (unless
    the tokenizer was made with `clean=`): `&amp;` stays the three tokens `&`, `amp`, `;`.
    """
    return lowercase(unicode_data().whitespace.sub(" ", nfc(text)))


def clean_ftfy(text: str) -> str:
    """SD1.5's training-time cleaning (transformers 4.19's slow tokenizer with ftfy):
    `ftfy.fix_text`, whitespace runs -> " ", strip, then `str.lower` of the whole string."""
    import ftfy

    return unicode_data().whitespace.sub(" ", ftfy.fix_text(text)).strip().lower()


def clean_openai(text: str) -> str:
    """OpenAI's CLIP `simple_tokenizer`: like `clean_ftfy`, with `html.unescape` twice after ftfy."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return unicode_data().whitespace.sub(" ", text).strip().lower()


CLEANERS: dict[str | None, Callable[[str], str] | None] = {None: None, "ftfy": clean_ftfy, "openai": clean_openai}


# -------------------------------------------------------------- step 2: pre-tokenize

@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """Map each of the 256 byte values to one printable Unicode character.

    BPE works on strings, and we want every byte to be a visible, non-space character so
    that vocabulary files stay readable. Printable Latin-1 bytes (`!`..`~`, `¡`..`¬`,
    `®`..`ÿ`) stand for themselves; the 68 others (controls, space, ...) are sent to
    `Ā` (256) and up. So the space byte 0x20 is `Ġ`, and "é" (bytes C3 A9) is `Ã©`.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


_BYTE_ALPHABET: dict[int, str] = {}


def byte_encode(word: str) -> str:
    """Write `word` as UTF-8 bytes, one printable character per byte (`"é"` -> `"Ã©"`)."""
    if not _BYTE_ALPHABET:
        _BYTE_ALPHABET.update(bytes_to_unicode())  # byte b (as the latin-1 character chr(b)) -> its character
    return word.encode("utf-8").decode("latin-1").translate(_BYTE_ALPHABET)


def byte_decode(text: str) -> str:
    """Undo `byte_encode`. Invalid UTF-8 (a cut multi-byte character) becomes `�`."""
    table = {c: b for b, c in bytes_to_unicode().items()}
    return bytes(table[c] for c in text).decode("utf-8", errors="replace")


def pre_tokenize(text: str) -> list[str]:
    """Step 2: cut normalized text into words, returned in the byte alphabet.

    `pre_tokenize("café, 2 cats")` -> `['cafÃ©', ',', '2', 'cats']`.
    """
    words = []
    for word in unicode_data().word.findall(text):
        if word in (BOS, EOS):
            # Only reached by "<|ENDOFTEXT|>" typed in another case and lowered by step 1
            # (the exact strings were already taken out as special tokens). transformers
            # keeps it as one match, which ends the punctuation run, then cuts it in three.
            words += ["<|", word[2:-2], "|>"]
        else:
            words.append(word)
    return [byte_encode(word) for word in words]


def check_prompt(text, where: str = "prompt") -> str:
    """`text` itself if it is a string the tokenizer can read; else an `ArgumentError` naming it."""
    if not isinstance(text, str):
        fix = "decode it first: prompt.decode('utf-8')" if isinstance(text, (bytes, bytearray)) else "pass a str"
        raise ArgumentError(f"{where} must be a str, not {type(text).__name__} ({text!r:.60}); {fix}")
    bad = None if text.isascii() else SURROGATE.search(text)
    if bad is not None:
        raise ArgumentError(f"{where} contains a lone surrogate U+{ord(bad.group()):04X} at index {bad.start()}, "
                            "which is not a character and has no UTF-8 form (text decoded with "
                            "errors='surrogateescape'?); decode the bytes with errors='replace'")
    return text


class BPEStep(NamedTuple):
    """One step of `CLIPTokenizer.bpe_steps`: the pair merged, its rank, the pieces after."""

    pair: tuple[str, str] | None  # None for the starting point (single bytes)
    rank: int | None  # position of the merge in the merges file: lower = learned earlier
    pieces: tuple[str, ...]


class BatchEncoding(dict):
    """What calling the tokenizer returns: a dict that also allows `enc.input_ids`."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class CLIPTokenizer:
    """CLIP's byte-level BPE tokenizer, compatible with how SD pipelines call tokenizers.

    Build it with `load_tokenizer()`. Main attributes:

    - `vocab`: dict token -> id (49,408 entries); `merges`: list of pairs, best first;
    - `bos_token_id` = 49406, `eos_token_id` = `pad_token_id` = 49407;
    - `model_max_length` = 77;
    - `clean`: None (default), `"ftfy"` or `"openai"`: the text cleaning done before step 1
      (see the module's docstring).
    """

    def __init__(
        self,
        vocab_file: str | Path | None = None,
        merges_file: str | Path | None = None,
        *,
        merges: list[tuple[str, str]] | None = None,
        model_max_length: int = MODEL_MAX_LENGTH,
        clean: str | None = None,
    ):
        """`CLIPTokenizer()` uses the merges packaged with sdlab; `CLIPTokenizer("vocab.json",
        merges_file="merges.txt")` reads Hugging Face files, as the seed's code does."""
        self.clean = clean
        self.cleaner = _cleaner(clean)
        if merges is None:
            merges = read_merges(merges_file)
        # The vocabulary is built in a fixed order, so ids are the same as OpenAI's:
        #   0..255      the 256 byte characters (a piece in the middle of a word)
        #   256..511    the same with "</w>" (a piece that ends a word)
        #   512..49405  one token per merge, in merge order ("i" + "n" -> "in" is 512)
        #   49406/49407 <|startoftext|> and <|endoftext|>
        byte_chars = list(bytes_to_unicode().values())
        tokens = byte_chars + [c + END_OF_WORD for c in byte_chars]
        tokens += ["".join(pair) for pair in merges]
        tokens += [BOS, EOS]
        self.vocab: dict[str, int] = {token: i for i, token in enumerate(tokens)}
        self.id_to_token: list[str] = tokens
        self.merges: list[tuple[str, str]] = list(merges)
        self.ranks: dict[tuple[str, str], int] = {pair: i for i, pair in enumerate(merges)}
        self.model_max_length = model_max_length
        self.bos_token, self.eos_token, self.pad_token = BOS, EOS, EOS
        self.bos_token_id = self.vocab[BOS]
        self.eos_token_id = self.vocab[EOS]
        self.pad_token_id = self.vocab[EOS]  # SD1.5 pads with <|endoftext|>
        self.cache: dict[str, tuple[str, ...]] = {}  # word -> BPE pieces, like CLIP's cache
        self.added_tokens: list[str] = []  # see `add_tokens`
        self._special = SPECIAL_TOKENS  # what `tokenize` splits out of the text before anything else
        if vocab_file is not None:
            given = json.loads(Path(vocab_file).read_text(encoding="utf-8"))
            if given != self.vocab:
                raise ValueError(f"{vocab_file} does not match the merges in {merges_file or DEFAULT_MERGES_PATH}; "
                                 "pass the vocab.json and merges.txt of the same CLIP tokenizer")

    def __len__(self) -> int:
        return len(self.vocab)

    def add_tokens(self, tokens) -> list[int]:
        """Add new whole tokens (textual inversion's `"<diamond>"`) after the 49,408; returns their ids.

        An added token is cut out of a prompt exactly as written (case and all), before cleaning,
        normalizing and BPE, as the special tokens are, and becomes one id: `"a red <diamond>"` ->
        `[320, 736, 49408]`. The text encoder needs a row for each new id
        (`sdlab.clip.add_token_embeddings`). A token already in the vocabulary, an empty one,
        or one with whitespace is an `ArgumentError`. Prompts without an added token keep their ids.
        """
        tokens = [tokens] if isinstance(tokens, str) else list(tokens)
        for token in tokens:
            if not isinstance(token, str) or not token or any(c.isspace() for c in token):
                raise ArgumentError(f"token must be a non-empty str without whitespace, like '<diamond>'; got {token!r}")
            if token in self.vocab or tokens.count(token) > 1:
                raise ArgumentError(f"token {token!r} is already in the vocabulary (id {self.vocab.get(token)}); "
                                    "pick another name, like '<my-concept>'")
        for token in tokens:
            self.vocab[token] = len(self.id_to_token)
            self.id_to_token.append(token)
            self.added_tokens.append(token)
        whole = sorted([BOS, EOS, *self.added_tokens], key=len, reverse=True)  # longest first
        self._special = re.compile("(" + "|".join(re.escape(t) for t in whole) + ")")
        return [self.vocab[token] for token in tokens]

    def __repr__(self) -> str:
        return f"CLIPTokenizer(vocab_size={len(self)}, model_max_length={self.model_max_length})"

    # ----------------------------------------------------------------- step 3: BPE

    def bpe_steps(self, word: str) -> list[BPEStep]:
        """Run BPE on one word and return every intermediate segmentation.

        `word` is one pre-token in the byte alphabet (for plain ASCII that is the word
        itself). At each step we look at all neighbouring pairs, pick the one that comes
        first in the merges file, and glue **every** occurrence of it, left to right.
        We stop when no neighbouring pair is a known merge.

        ```python
        for step in tok.bpe_steps("tokenizer"):
            print(step.pair, step.pieces)
        # None              ('t', 'o', 'k', 'e', 'n', 'i', 'z', 'e', 'r</w>')
        # ('e', 'n')        ('t', 'o', 'k', 'en', 'i', 'z', 'e', 'r</w>')
        # ('e', 'r</w>')    ('t', 'o', 'k', 'en', 'i', 'z', 'er</w>')
        # ('t', 'o')        ('to', 'k', 'en', 'i', 'z', 'er</w>')
        # ('k', 'en')       ('to', 'ken', 'i', 'z', 'er</w>')
        # ('i', 'z')        ('to', 'ken', 'iz', 'er</w>')
        # ('iz', 'er</w>')  ('to', 'ken', 'izer</w>')
        # ('to', 'ken')     ('token', 'izer</w>')
        ```
        """
        pieces = tuple(word[:-1]) + (word[-1] + END_OF_WORD,)
        steps = [BPEStep(None, None, pieces)]
        while len(pieces) > 1:
            pairs = set(zip(pieces, pieces[1:]))
            best = min(pairs, key=lambda pair: self.ranks.get(pair, float("inf")))
            if best not in self.ranks:
                break  # no known merge left
            merged, i = [], 0
            while i < len(pieces):
                if i < len(pieces) - 1 and (pieces[i], pieces[i + 1]) == best:
                    merged.append(pieces[i] + pieces[i + 1])
                    i += 2
                else:
                    merged.append(pieces[i])
                    i += 1
            pieces = tuple(merged)
            steps.append(BPEStep(best, self.ranks[best], pieces))
        return steps

    def bpe(self, word: str) -> tuple[str, ...]:
        """The final BPE pieces of one word (byte alphabet), cached: prompts repeat words.

        Same result as `bpe_steps(word)[-1].pieces`, found the way the Rust `tokenizers`
        library does it: a heap of the neighbouring pairs by (rank, position), so a word of
        n bytes costs O(n log n) instead of O(n²) (a 10,000-character Chinese paragraph is one
        word). `bpe_steps` merges every occurrence of the best pair at once, the heap one
        occurrence at a time from the left; with CLIP's merges, where a merge never uses a
        token made by a later merge, both orders end in the same pieces (the tests check it).
        """
        pieces = self.cache.get(word)
        if pieces is None:
            pieces = self.cache[word] = self._merge(word)
            if len(self.cache) > CACHE_SIZE:
                self.cache.clear()
        return pieces

    def _merge(self, word: str) -> tuple[str, ...]:
        symbols: list[str | None] = [*word[:-1], word[-1] + END_OF_WORD]
        ranks = self.ranks
        after = [*range(1, len(symbols)), -1]  # index of the next live symbol, -1 at the end
        before = list(range(-1, len(symbols) - 1))
        heap = [(ranks[pair], i) for i, pair in enumerate(pairwise(symbols)) if pair in ranks]
        heapq.heapify(heap)
        while heap:
            rank, i = heapq.heappop(heap)
            j = after[i]
            if symbols[i] is None or j < 0 or ranks.get((symbols[i], symbols[j])) != rank:
                continue  # stale: one of the two was merged into something else meanwhile
            symbols[i] += symbols[j]
            symbols[j] = None
            after[i] = k = after[j]
            if k >= 0:
                before[k] = i
                if (symbols[i], symbols[k]) in ranks:
                    heapq.heappush(heap, (ranks[symbols[i], symbols[k]], i))
            h = before[i]
            if h >= 0 and (symbols[h], symbols[i]) in ranks:
                heapq.heappush(heap, (ranks[symbols[h], symbols[i]], h))
        return tuple(s for s in symbols if s is not None)

    # ---------------------------------------------------------- text <-> tokens/ids

    def tokenize(self, text: str) -> list[str]:
        """The BPE pieces of `text` (no BOS/EOS), e.g. `['a</w>', 'photo</w>']`.

        The strings `<|startoftext|>` and `<|endoftext|>` typed in the prompt (exact case)
        are kept as the special tokens, as transformers does. With `clean=`, each stretch
        between them is cleaned first (and one that cleaning turns into such a string counts
        as that token too, as in transformers 4.19). Anything but a `str` without lone
        surrogates raises an `ArgumentError` naming `prompt`.
        """
        special = (BOS, EOS, *self.added_tokens)
        parts = self._special.split(check_prompt(text))
        if self.cleaner is not None:
            parts = [bit for part in parts for bit in ([part] if part in special else
                                                       self._special.split(self.cleaner(part)))]
        tokens: list[str] = []
        for part in parts:
            if part in special:
                tokens.append(part)
            else:
                for word in pre_tokenize(normalize(part)):
                    tokens.extend(self.bpe(word))
        return tokens

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, **without** BOS/EOS and without any length limit."""
        return [self.vocab[token] for token in self.tokenize(text)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Ids back to text: join the pieces, bytes -> UTF-8, each `</w>` becomes a space.

        Text comes back normalized (lower case) and punctuation comes back as its own
        word: `"A cat, sleeping"` decodes to `"a cat , sleeping"`. Same output as
        transformers' `decode`.
        """
        if hasattr(ids, "tolist"):  # a tensor or a numpy array
            ids = ids.tolist()
        special = {self.bos_token_id, self.eos_token_id}
        tokens = [self.id_to_token[i] for i in ids if not (skip_special_tokens and i in special)]
        return byte_decode("".join(tokens)).replace(END_OF_WORD, " ").strip()

    def batch_decode(self, sequences, skip_special_tokens: bool = False) -> list[str]:
        if hasattr(sequences, "tolist"):
            sequences = sequences.tolist()
        return [self.decode(ids, skip_special_tokens=skip_special_tokens) for ids in sequences]

    # -------------------------------------------------- step 4: the pipeline interface

    def __call__(
        self,
        text: str | list[str],
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        return_tensors: str | None = None,
        add_special_tokens: bool = True,
        return_attention_mask: bool = True,
        **unused,
    ) -> BatchEncoding:
        """Encode one prompt or a batch, the way diffusers calls a transformers tokenizer.

        ```python
        tok(prompts, padding="max_length", max_length=77, truncation=True).input_ids
        ```

        - `padding`: `False` (none), `True`/`"longest"` (to the longest prompt of the
          batch) or `"max_length"` (to `max_length`, default 77); padding is on the
          right, with `<|endoftext|>`.
        - `truncation`: `True` cuts a prompt to `max_length` ids (default 77), keeping
          BOS, the first 75 tokens and EOS. A `UserWarning` says how many tokens were
          dropped, and which. Left as `None` it truncates when `max_length` is given.
          (transformers does not truncate when `padding` is set too, and hands the
          text encoder rows longer than its 77 positions; we truncate instead.)
        - `return_tensors`: `None` (lists), `"pt"` (torch) or `"np"` (numpy).

        Returns a `BatchEncoding` with `input_ids` and `attention_mask` (1 = real token,
        0 = padding). Like transformers, a single string gives flat lists, not a batch.
        """
        single = isinstance(text, str)
        texts = [text] if single else _prompt_list(text)
        if truncation is None:
            truncation = max_length is not None
        truncation = truncation not in (False, "do_not_truncate")
        if max_length is None:
            max_length = self.model_max_length

        all_ids = []
        for prompt in texts:
            ids = self.encode(prompt)
            n_special = 2 if add_special_tokens else 0
            keep = max_length - n_special
            if truncation and len(ids) > keep:
                dropped = ids[keep:]
                warnings.warn(
                    f"The prompt is {len(ids) + n_special} tokens long but the text encoder "
                    f"reads at most {max_length}: {len(dropped)} tokens were dropped: "
                    f"{_shorten(self.decode(dropped[:SHOWN_DROPPED]))!r}",
                    UserWarning,
                    stacklevel=2,
                )
                ids = ids[:keep]
            if add_special_tokens:
                ids = [self.bos_token_id, *ids, self.eos_token_id]
            all_ids.append(ids)

        if padding in (True, "longest"):
            target = max(map(len, all_ids), default=0)
        elif padding == "max_length":
            target = max_length
        else:  # False or "do_not_pad"
            target = 0
        masks = [[1] * len(ids) + [0] * (target - len(ids)) for ids in all_ids]
        all_ids = [ids + [self.pad_token_id] * (target - len(ids)) for ids in all_ids]

        out = BatchEncoding(input_ids=all_ids)
        if return_attention_mask:
            out["attention_mask"] = masks
        if return_tensors == "pt":
            import torch

            out = BatchEncoding({k: torch.tensor(v, dtype=torch.long) for k, v in out.items()})
        elif return_tensors == "np":
            import numpy as np

            out = BatchEncoding({k: np.array(v, dtype=np.int64) for k, v in out.items()})
        elif return_tensors is not None:
            raise ValueError(f"return_tensors must be None, 'pt' or 'np', not {return_tensors!r}")
        elif single:
            out = BatchEncoding({k: v[0] for k, v in out.items()})
        return out

    def batch_encode_plus(self, texts: list[str], **kwargs) -> BatchEncoding:
        """The older transformers name for calling the tokenizer on a list of prompts."""
        return self(list(texts), **kwargs)

    # ------------------------------------------------------------- vocabulary files

    def save_vocabulary(self, directory: str | Path) -> tuple[Path, Path, Path]:
        """Write the Hugging Face tokenizer files into `directory`; see `vocab_files`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        vocab_path = directory / "vocab.json"
        merges_path = directory / "merges.txt"
        config_path = directory / "tokenizer_config.json"
        vocab_path.write_text(json.dumps(self.vocab, ensure_ascii=False), encoding="utf-8")
        lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in self.merges]
        merges_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        config = {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": self.model_max_length,
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": EOS,
            "unk_token": EOS,
        }
        config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        return vocab_path, merges_path, config_path


def read_merges(path: str | Path | None = None) -> list[tuple[str, str]]:
    """Read the merges CLIP uses from OpenAI's `bpe_simple_vocab_16e6.txt.gz`.

    Line 1 is a header (`"bpe_simple_vocab_16e6.txt#version: 0.2"`); each further line is
    one merge, `"i n"`, best first. The file holds 262,145 lines, CLIP keeps the first
    48,894 merges. A plain (not gzipped) `merges.txt` works too.
    """
    path = Path(path) if path is not None else DEFAULT_MERGES_PATH
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic number
        raw = gzip.decompress(raw)
    lines = raw.decode("utf-8").split("\n")
    return [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]


def load_tokenizer(path: str | Path | None = None, *, clean: str | None = None) -> CLIPTokenizer:
    """The SD1.5 / CLIP ViT-L/14 tokenizer, from the merges file packaged with sdlab.

    `clean="ftfy"` gives the ids of SD1.5's training (see the module's docstring)."""
    _cleaner(clean)  # refuse a wrong `clean` before reading the merges
    return CLIPTokenizer(merges=read_merges(path), clean=clean)


def _cleaner(clean: str | None) -> Callable[[str], str] | None:
    """The cleaning function for `clean=`, after checking that it exists and can run."""
    if not isinstance(clean, (str, type(None))) or clean not in CLEANERS:
        raise ArgumentError(f"clean must be None, 'ftfy' or 'openai', not {clean!r}")
    if clean is not None:
        try:
            import ftfy  # noqa: F401
        except ImportError:
            raise ArgumentError(f"clean={clean!r} needs the ftfy package, which is not installed: "
                                "pip install ftfy (or leave clean=None)") from None
    return CLEANERS[clean]


def _prompt_list(texts) -> list[str]:
    """A batch of prompts as a list, each checked (`ArgumentError` naming `prompt`)."""
    if isinstance(texts, (bytes, bytearray, memoryview)):
        check_prompt(texts)  # raises, with the fix for bytes
    if isinstance(texts, (Mapping, AbstractSet)) or not isinstance(texts, Iterable):
        raise ArgumentError(f"prompt must be a str or a list of str, not {type(texts).__name__} ({texts!r:.60})")
    texts = list(texts)
    for i, text in enumerate(texts):
        check_prompt(text, where=f"prompt {i} of the batch")
    return texts


def _shorten(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else f"{text[:limit]}…"


def vocab_files(directory: str | Path, tokenizer: CLIPTokenizer | None = None) -> tuple[Path, Path, Path]:
    """Write `vocab.json`, `merges.txt` and `tokenizer_config.json` into `directory`.

    These are the Hugging Face files of SD1.5's tokenizer (77 positions, padding with
    `<|endoftext|>`), so `transformers.CLIPTokenizer.from_pretrained(directory)` builds
    the reference tokenizer without the Hub. Returns the three paths.
    """
    return (tokenizer or load_tokenizer()).save_vocabulary(directory)
