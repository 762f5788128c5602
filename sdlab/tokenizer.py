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
(version 5), the tokenizer `diffusers` uses for SD1.5; the tests check this on many prompts.

```python
from sdlab.tokenizer import load_tokenizer

tok = load_tokenizer()
tok.tokenize("a photo of a cat")  # ['a</w>', 'photo</w>', 'of</w>', 'a</w>', 'cat</w>']
tok.encode("a photo of a cat")    # [320, 1125, 539, 320, 2368]
tok(["a photo of a cat"], padding="max_length", max_length=77, truncation=True).input_ids
```
"""

from __future__ import annotations

import functools
import gzip
import json
import unicodedata
import warnings
from pathlib import Path
from typing import Iterable, NamedTuple

import regex  # like `re`, but knows Unicode classes such as \p{L} (letters)

DEFAULT_MERGES_PATH = Path(__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
END_OF_WORD = "</w>"
MODEL_MAX_LENGTH = 77  # positions of the CLIP text encoder
N_MERGES = 49152 - 256 - 2  # CLIP keeps only the first 48,894 merges of the file

# Step 2: the pre-tokenizer. Alternatives are tried left to right, so "it's" gives "it"
# and "'s", and "'sun" gives "'s" and "un" (a quirk of CLIP, kept for identical ids).
# Each digit is a word of its own: "2024" is four tokens. `\s` here is Unicode white
# space; the `regex` module agrees with the Rust library behind transformers on it, while
# Python's `re` would also count the control characters \x1c-\x1f as space.
WORD_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+"""
)
WHITESPACE = regex.compile(r"\s+")
SPECIAL_TOKENS = regex.compile(r"(<\|startoftext\|>|<\|endoftext\|>)")


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


def byte_encode(word: str) -> str:
    """Write `word` as UTF-8 bytes, one printable character per byte (`"é"` -> `"Ã©"`)."""
    table = bytes_to_unicode()
    return "".join(table[b] for b in word.encode("utf-8"))


def byte_decode(text: str) -> str:
    """Undo `byte_encode`. Invalid UTF-8 (a cut multi-byte character) becomes `�`."""
    table = {c: b for b, c in bytes_to_unicode().items()}
    return bytes(table[c] for c in text).decode("utf-8", errors="replace")


def normalize(text: str) -> str:
    """Step 1, exactly as `transformers.CLIPTokenizer` (v5) normalizes text.

    - Unicode NFC, so "e" + combining accent and the single character "é" are the same;
    - every run of white space (spaces, tabs, newlines, no-break spaces...) becomes " ";
    - lower case, **one character at a time** (so a final "Σ" becomes "σ", not "ς").

    Unlike OpenAI's original code there is no `ftfy` repair and no HTML unescaping:
    `&amp;` stays the three tokens `&`, `amp`, `;`.
    """
    text = unicodedata.normalize("NFC", text)
    text = WHITESPACE.sub(" ", text)
    return "".join(ch.lower() for ch in text)


def pre_tokenize(text: str) -> list[str]:
    """Step 2: cut normalized text into words, returned in the byte alphabet.

    `pre_tokenize("café, 2 cats")` -> `['cafÃ©', ',', '2', 'cats']`.
    """
    words = []
    for word in WORD_PATTERN.findall(text):
        if word in (BOS, EOS):
            # Only reached by "<|ENDOFTEXT|>" typed in another case and lowered by step 1
            # (the exact strings were already taken out as special tokens). transformers
            # keeps it as one match, which ends the punctuation run, then cuts it in three.
            words += ["<|", word[2:-2], "|>"]
        else:
            words.append(word)
    return [byte_encode(word) for word in words]


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
    - `model_max_length` = 77.
    """

    def __init__(
        self,
        vocab_file: str | Path | None = None,
        merges_file: str | Path | None = None,
        *,
        merges: list[tuple[str, str]] | None = None,
        model_max_length: int = MODEL_MAX_LENGTH,
    ):
        """`CLIPTokenizer()` uses the merges packaged with sdlab; `CLIPTokenizer("vocab.json",
        merges_file="merges.txt")` reads Hugging Face files, as the seed's code does."""
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
        if vocab_file is not None:
            given = json.loads(Path(vocab_file).read_text(encoding="utf-8"))
            if given != self.vocab:
                raise ValueError(f"{vocab_file} does not match the merges in {merges_file or DEFAULT_MERGES_PATH}; "
                                 "pass the vocab.json and merges.txt of the same CLIP tokenizer")

    def __len__(self) -> int:
        return len(self.vocab)

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
        """The final BPE pieces of one word (byte alphabet), cached: prompts repeat words."""
        if word not in self.cache:
            self.cache[word] = self.bpe_steps(word)[-1].pieces
        return self.cache[word]

    # ---------------------------------------------------------- text <-> tokens/ids

    def tokenize(self, text: str) -> list[str]:
        """The BPE pieces of `text` (no BOS/EOS), e.g. `['a</w>', 'photo</w>']`.

        The strings `<|startoftext|>` and `<|endoftext|>` typed in the prompt (exact case)
        are kept as the special tokens, as transformers does.
        """
        tokens = []
        for part in SPECIAL_TOKENS.split(text):
            if part in (BOS, EOS):
                tokens.append(part)
                continue
            for word in pre_tokenize(normalize(part)):
                tokens.extend(self.bpe(word))
        return tokens

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, **without** BOS/EOS and without any length limit."""
        return [self.vocab[token] for token in self.tokenize(text)]

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        return [self.id_to_token[int(i)] for i in ids]

    def convert_tokens_to_ids(self, tokens: Iterable[str]) -> list[int]:
        return [self.vocab[token] for token in tokens]

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
        texts = [text] if single else list(text)
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
                    f"{self.decode(dropped)!r}",
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


def load_tokenizer(path: str | Path | None = None) -> CLIPTokenizer:
    """The SD1.5 / CLIP ViT-L/14 tokenizer, from the merges file packaged with sdlab."""
    return CLIPTokenizer(merges=read_merges(path))


def vocab_files(directory: str | Path, tokenizer: CLIPTokenizer | None = None) -> tuple[Path, Path, Path]:
    """Write `vocab.json`, `merges.txt` and `tokenizer_config.json` into `directory`.

    These are the Hugging Face files of SD1.5's tokenizer (77 positions, padding with
    `<|endoftext|>`), so `transformers.CLIPTokenizer.from_pretrained(directory)` builds
    the reference tokenizer without the Hub. Returns the three paths.
    """
    return (tokenizer or load_tokenizer()).save_vocabulary(directory)
