"""Our CLIP tokenizer must give the ids of transformers' CLIPTokenizer (the one diffusers
uses for SD1.5), built here from the same OpenAI merges file, without the Hub."""

from __future__ import annotations

import gzip
import warnings

import pytest
import torch
from transformers import CLIPTokenizer as HFCLIPTokenizer

from sdlab.tokenizer import DEFAULT_MERGES_PATH, load_tokenizer, vocab_files

LONG_PROMPT = (
    "a highly detailed matte painting of a medieval castle on a cliff above a stormy sea, "
    "dramatic lighting, volumetric clouds, golden hour, by greg rutkowski and thomas kinkade, "
    "trending on artstation, 8k resolution, unreal engine 5, octane render, sharp focus, "
    "intricate details, hyperrealistic, cinematic composition, wide angle lens, 35mm film grain, "
    "award winning photograph, masterpiece, best quality, ultra detailed"
)

PROMPTS = [
    "",
    "a photo of a cat",
    "A Photo Of A CAT",
    "an astronaut riding a horse on mars",
    "a painting of a fox sitting in a field at sunrise in the style of claude monet",
    "portrait of a woman, oil on canvas, 4k, trending on artstation!!!",
    "it's a dog's life",
    "don't stop, we're here, they've gone, I'm fine, you'll see, he'd know",
    "IT'S LOUD, DON'T SHOUT",
    "'sunrise' and 'twilight'",
    "rock 'n' roll",
    "the year 2024 and 1999, 3.14159, 10,000 km, 50%",
    "a 1080p 60fps render of 007",
    "multiple   spaces\tand\ttabs\nand\nnewlines\r\nand CRLF",
    "   leading and trailing whitespace   ",
    "\n\t\n",
    "no\u00a0break\u3000ideographic\u2003em spaces",
    "café crème brûlée à la française",
    "über schöne Straße mit Ärger",
    "niño jalapeño señor España",
    "cafe\u0301 (combining accent, becomes NFC)",
    "一只猫坐在窗台上",
    "富士山の写真、浮世絵スタイル",
    "서울의 밤거리 네온사인",
    "a cat 🐱 with a hat 🎩 and sunglasses 😎",
    "family 👨‍👩‍👧 thumbs up 👍🏽 flags 🇫🇷🇯🇵",
    "Москва зимой, красная площадь",
    "ΟΔΥΣΣΕΥΣ και Σίσυφος, ελληνικός ναός",
    "مدينة عربية قديمة عند الغروب",
    "हिमालय पर्वत पर सूर्योदय",
    "tom &amp; jerry &lt;3 &quot;quoted&quot; &#39;apos&#39;",
    "<b>bold</b> and <i>html tags</i>",
    "email@example.com https://example.com/path?query=1&x=2",
    "c++ c# f# .net node.js",
    "snake_case and kebab-case and CamelCase",
    "(masterpiece:1.2), [background], {braces}, <lora:foo:0.8>",
    "...!!!???---___***",
    "“curly quotes” and ‘single’ and — dashes – and … ellipsis",
    "x² + y³ = z½, ① ② ③, Ⅻ, ٣",
    "ﬁne ligature ﬂour",
    "İstanbul and ß and ẞ",
    "zero\u200bwidth\ufeffbom",
    "tab\x0bvertical\x0cformfeed\x1cfile-separator",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "a<|endoftext|>b and <|startoftext|>c",
    "typed in capitals <|ENDOFTEXT|>? <|StartOfText|>!",
    "a portrait of elon musk as a pirate, hyperdetailed, unreal engine",
    "photorealistic render of a red sports car, studio lighting, reflections",
    "isometric pixel art of a tiny cozy cabin in the woods",
    "1girl, solo, long hair, looking at viewer, smile",
    "a bowl of ramen, food photography, 85mm, f/1.8, bokeh",
    "watercolor illustration of a lighthouse; soft pastel colors.",
    LONG_PROMPT,
    " ".join(["cat"] * 100),
]

SIMPLE_ASCII = [
    "a photo of a cat",
    "an astronaut riding a horse on mars",
    "a painting of a fox sitting in a field at sunrise",
    "isometric pixel art of a tiny cozy cabin in the woods",
    "photorealistic render of a red sports car",
]


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
    lines = gzip.open(DEFAULT_MERGES_PATH).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


@pytest.fixture(scope="session")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="session")
def ref():
    # transformers 5 ignores `vocab_file=`: pass the vocabulary and merges themselves.
    vocab, merges = openai_vocab_and_merges()
    return HFCLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


@pytest.fixture(scope="session")
def ref_from_files(tok, tmp_path_factory):
    directory = tmp_path_factory.mktemp("clip_tokenizer")
    paths = vocab_files(directory, tok)
    assert all(p.exists() for p in paths)
    return HFCLIPTokenizer.from_pretrained(directory)


def test_reference_is_a_real_clip_tokenizer(ref, tok):
    assert len(ref) == 49408
    assert ref("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert ref.get_vocab() == tok.vocab


def test_vocab_size_and_special_tokens(tok):
    assert len(tok) == len(tok.vocab) == 49408
    assert len(tok.merges) == 49152 - 256 - 2
    assert tok.bos_token_id == tok.vocab["<|startoftext|>"] == 49406
    assert tok.eos_token_id == tok.vocab["<|endoftext|>"] == 49407
    assert tok.pad_token_id == 49407
    assert tok.model_max_length == 77
    assert tok.vocab["!"] == 0 and tok.vocab["!</w>"] == 256 and tok.vocab["in"] == 512
    assert tok.merges[0] == ("i", "n")


@pytest.mark.parametrize("prompt", PROMPTS)
def test_unpadded_ids_match_transformers(tok, ref, prompt):
    assert tok.encode(prompt) == ref(prompt, add_special_tokens=False).input_ids
    assert tok(prompt).input_ids == ref(prompt).input_ids
    assert tok.tokenize(prompt) == ref.tokenize(prompt)


def test_padded_batch_matches_transformers(tok, ref):
    kwargs = dict(padding="max_length", max_length=77, truncation=True)
    with pytest.warns(UserWarning, match="dropped"):  # the two long prompts
        ours = tok(PROMPTS, **kwargs)
    theirs = ref(PROMPTS, **kwargs)
    assert ours.input_ids == theirs.input_ids
    assert ours.attention_mask == theirs.attention_mask
    assert all(len(row) == 77 for row in ours.input_ids)


def test_padding_longest_and_tensors_match_transformers(tok, ref):
    prompts = SIMPLE_ASCII + ["", "a cat"]
    assert tok(prompts, padding="longest").input_ids == ref(prompts, padding="longest").input_ids
    ours = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    theirs = ref(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert ours.input_ids.dtype == torch.long and ours.input_ids.shape == (len(prompts), 77)
    assert torch.equal(ours.input_ids, theirs.input_ids)
    assert torch.equal(ours["attention_mask"], theirs["attention_mask"])


def test_single_string(tok, ref):
    enc = tok("a photo of a cat", padding="max_length", max_length=77, truncation=True)
    assert enc.input_ids == ref("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert enc.input_ids[:7] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert enc.input_ids[7:] == [49407] * 70
    assert enc.attention_mask == [1] * 7 + [0] * 70
    assert tok("a photo of a cat", return_tensors="pt").input_ids.shape == (1, 7)


def test_empty_prompt(tok, ref):
    assert tok.encode("") == []
    assert tok("").input_ids == ref("").input_ids == [49406, 49407]
    row = tok([""], padding="max_length", max_length=77).input_ids[0]
    assert row == [49406] + [49407] * 76


def test_truncation_warns_and_matches_transformers(tok, ref):
    prompt = " ".join(["cat"] * 100)  # 100 tokens + BOS + EOS = 102 > 77
    with pytest.warns(UserWarning, match=r"102 tokens long.*25 tokens were dropped") as record:
        ours = tok([prompt], padding="max_length", max_length=77, truncation=True).input_ids
    assert "cat cat" in str(record[0].message)
    assert ours == ref([prompt], padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ours[0]) == 77 and ours[0][0] == 49406 and ours[0][-1] == 49407
    assert ours[0][1:-1] == [2368] * 75

    with pytest.warns(UserWarning, match="dropped"):
        long_row = tok(LONG_PROMPT, truncation=True).input_ids
    assert long_row == ref(LONG_PROMPT, truncation=True).input_ids
    assert len(long_row) == 77


def test_no_warning_when_the_prompt_fits(tok):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok(SIMPLE_ASCII, padding="max_length", max_length=77, truncation=True)
        tok(" ".join(["cat"] * 75), padding="max_length", max_length=77, truncation=True)


def test_no_truncation_when_disabled(tok, ref):
    prompt = " ".join(["cat"] * 100)
    assert tok(prompt, truncation=False).input_ids == ref(prompt).input_ids
    assert len(tok(prompt, truncation=False).input_ids) == 102


def test_seed_style_batch_encode_plus(tok, ref):
    prompts = SIMPLE_ASCII + [""]
    enc = tok.batch_encode_plus(prompts, padding="max_length", max_length=77)
    assert enc.input_ids == ref(prompts, padding="max_length", max_length=77).input_ids
    assert enc["input_ids"] == enc.input_ids
    # A long prompt is truncated (and warned about): the encoder has only 77 positions.
    with pytest.warns(UserWarning, match="dropped"):
        enc = tok.batch_encode_plus([LONG_PROMPT], padding="max_length", max_length=77)
    assert enc.input_ids == ref([LONG_PROMPT], padding="max_length", max_length=77, truncation=True).input_ids


def test_tokenizer_from_written_vocab_files(ref_from_files, tok):
    assert len(ref_from_files) == 49408
    assert ref_from_files.model_max_length == 77
    assert ref_from_files.pad_token_id == 49407
    kwargs = dict(padding="max_length", max_length=77, truncation=True)
    with pytest.warns(UserWarning):
        ours = tok(PROMPTS, **kwargs).input_ids
    assert ref_from_files(PROMPTS, **kwargs).input_ids == ours


@pytest.mark.parametrize("prompt", SIMPLE_ASCII)
def test_decode_round_trip(tok, prompt):
    assert tok.decode(tok.encode(prompt)) == prompt
    assert tok.decode(tok(prompt).input_ids, skip_special_tokens=True) == prompt
    padded = tok([prompt], padding="max_length", max_length=77).input_ids
    assert tok.batch_decode(padded, skip_special_tokens=True) == [prompt]


def test_decode_matches_transformers(tok, ref):
    rows = ref(PROMPTS).input_ids
    for row in rows:
        for skip in (False, True):
            assert tok.decode(row, skip_special_tokens=skip) == ref.decode(row, skip_special_tokens=skip)
    # A cut in the middle of a multi-byte character decodes to U+FFFD, as in transformers.
    cut = tok.encode("猫")[:1]
    assert tok.decode(cut) == ref.decode(cut)


def test_normalization_details(tok):
    assert tok.tokenize("2024") == ["2</w>", "0</w>", "2</w>", "4</w>"]  # one token per digit
    assert tok.tokenize("&amp;") == ["&</w>", "amp</w>", ";</w>"]  # no HTML unescaping
    assert tok.encode("A  Cat\n") == tok.encode("a cat")
    assert tok.encode("cafe\u0301") == tok.encode("caf\u00e9")  # NFC
    assert tok.tokenize("it's") == ["it</w>", "'s</w>"]
    assert tok.tokenize("é") == ["Ã©</w>"]  # UTF-8 bytes C3 A9 in the byte alphabet


def test_bpe_steps(tok):
    steps = tok.bpe_steps("tokenizer")
    assert steps[0].pair is None
    assert steps[0].pieces == ("t", "o", "k", "e", "n", "i", "z", "e", "r</w>")
    assert steps[-1].pieces == tok.bpe("tokenizer") == ("token", "izer</w>")
    ranks = [step.rank for step in steps[1:]]
    assert ranks == sorted(ranks) and len(set(ranks)) == len(ranks)  # merges in rank order
    for before, after in zip(steps, steps[1:]):
        assert "".join(before.pieces) == "".join(after.pieces)
        assert "".join(after.pair) in after.pieces
    assert "tokenizer" in tok.cache  # bpe() caches its result
