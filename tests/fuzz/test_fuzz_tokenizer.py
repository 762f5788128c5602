"""Hostile prompts for the tokenizer: lone surrogates, NULs, control characters, 1 MB strings,
bytes, None and other non-strings. Each case ends in 77 ids within the vocabulary, equal to
transformers' ids wherever transformers accepts the prompt, or in an sdlab error naming `prompt`."""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
from clip_reference import reference_tokenizer
from outcomes import judge

from sdlab.tokenizer import load_tokenizer

KWARGS = dict(padding="max_length", max_length=77, truncation=True)
VOCAB_SIZE = 49408


def _text(rng: random.Random, n: int) -> str:
    pool = ["a", "photo", "of", "a", "cat,", "it's", "DON'T", "2024", "café", "猫", "🐱", "Ωμέγα\t\n", "", ""]
    return " ".join(rng.choice(pool) for _ in range(n))


def _insert(rng: random.Random, text: str, bits: str) -> str:
    i = rng.randrange(len(text) + 1)
    return text[:i] + bits + text[i:]


def _cases() -> list[tuple[str, object]]:
    rng = random.Random(2026)
    cases: list[tuple[str, object]] = []
    for i in range(24):  # lone surrogates, alone, in text, or a UTF-16 pair written as two code units
        bits = rng.choice(["\ud800", "\udfff", "\ud83d", "\ude00", "\ud83d\ude00", "\udc80\udcff", "\udbff"])
        cases.append((f"surrogate-{i}", _insert(rng, _text(rng, rng.randint(0, 12)), bits)))
    for i in range(16):  # NULs
        bits = "\0" * rng.choice([1, 2, 7, 300])
        cases.append((f"nul-{i}", _insert(rng, _text(rng, rng.randint(0, 12)), bits)))
    controls = [*map(chr, range(0x20)), "\x7f", *map(chr, range(0x80, 0xA0)), "\u202e", "\u2066", "\u200b",
                "\ufeff", "\ufffe", "\uffff", "\U000e0001", "\U000e007f", "\x1b[31m", "\x1b]0;title\x07", "\r\n"]
    for i in range(20):
        text = _text(rng, rng.randint(0, 10))
        for _ in range(rng.randint(1, 6)):
            text = _insert(rng, text, rng.choice(controls))
        cases.append((f"control-{i}", text))
    for i in range(16):  # random code points of every plane (no surrogates)
        cps = [rng.choice([rng.randrange(0x20, 0xD800), rng.randrange(0xE000, 0x110000)]) for _ in range(rng.randint(1, 40))]
        cases.append((f"planes-{i}", "".join(map(chr, cps))))
    for i, text in enumerate(["", " ", "\t\n\r " * 50, "<|endoftext|>" * 100, "<|startoftext|>", "<|ENDOFTEXT|>!",
                              "'s'S't're've", "\u0301" * 50, "a" + "\u0301\u0323" * 500, "🏳️‍🌈" * 40]):
        cases.append((f"edge-{i}", text))
    big = {  # 1 MB (or about) strings
        "words": ("a photo of a cat " * 60_000)[:1_000_000],
        "cjk": "".join(chr(rng.randrange(0x4E00, 0x9FA0)) for _ in range(330_000)),
        "nul": "\0" * 250_000,
        "spaces": " \t\n\u3000" * 250_000,
        "letters": "a" * 100_000,
        "emoji": "👨\u200d👩\u200d👧" * 5_000,
    }
    cases += [(f"1MB-{name}", text) for name, text in big.items()]
    not_text = [None, 3, 3.5, True, 10**30, object(), {"a": 1}, b"a cat", bytearray(b"a cat"), b"\xff\xfe",
                memoryview(b"cat"), ["a cat", None], ["a cat", b"a dog"], [["nested"]], ("a", 5), [3], {"a cat"},
                np.float32(1.0), Ellipsis, type, lambda: "a cat"]
    cases += [(f"not-text-{i}", value) for i, value in enumerate(not_text)]
    batches = [["a cat", "a dog"], ("a cat",), [], ["x\0y", "\u0301"], [np.str_("a numpy string")], np.str_("a cat")]
    cases += [(f"accepted-{i}", value) for i, value in enumerate(batches)]
    return cases


CASES = _cases()


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def ref():
    return reference_tokenizer()


def _rows(value, prompt) -> list[list[int]]:
    return [value] if isinstance(prompt, str) else value


def _reference_rows(ref, prompt):
    """transformers' ids, or None where it does not take the prompt (it raises, or is not fed)."""
    if not isinstance(prompt, (str, list, tuple)) or not all(isinstance(p, str) for p in ([prompt] if isinstance(prompt, str) else prompt)):
        return None
    if not prompt and not isinstance(prompt, str):
        return []
    try:
        return _rows(ref(prompt if isinstance(prompt, str) else [str(p) for p in prompt], **KWARGS).input_ids, prompt)
    except Exception:  # noqa: BLE001 - lone surrogates: the Rust side cannot take them
        return None


def test_enough_cases():
    assert len(CASES) >= 100


@pytest.mark.parametrize("name, prompt", CASES, ids=[name for name, _ in CASES])
def test_hostile_prompt(tok, ref, name, prompt):
    def run():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # long prompts warn that tokens were dropped
            return tok(prompt, **KWARGS).input_ids

    def sane(value) -> bool:
        rows = _rows(value, prompt)
        if not all(len(row) == 77 and row[0] == 49406 and row[-1] == 49407 and
                   all(isinstance(i, int) and 0 <= i < VOCAB_SIZE for i in row) for row in rows):
            return False
        expected = _reference_rows(ref, prompt)
        return expected is None or rows == expected

    outcome = judge("tokenizer", run, names=("prompt",), sane=sane, timeout=60)
    if name.startswith(("surrogate", "not-text")):
        assert outcome == "refused"
    else:
        assert outcome == "accepted"
