"""Our CLIP tokenizer must give the ids of transformers' CLIPTokenizer (the one diffusers
uses for SD1.5), built here from the same OpenAI merges file, without the Hub, on every string;
and with `clean="ftfy"` the ids of SD1.5's training-time cleaning."""

from __future__ import annotations

import random
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from clip_reference import (
    corpus,
    openai_clean,
    real_lines,
    reference_tokenizer,
    training_time_clean,
    unicode_tables_text,
)
from transformers import CLIPTokenizer as HFCLIPTokenizer

from sdlab.errors import ArgumentError
from sdlab.tokenizer import UNICODE_TABLES_PATH, CLIPTokenizer, load_tokenizer, nfc, vocab_files

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


@pytest.fixture(scope="session")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="session")
def ref():
    return reference_tokenizer()


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


# ------------------------------------------------------------------------ any text at all


def reference_ids(ref, lines):
    return [ref(line, add_special_tokens=False).input_ids for line in lines]


def test_unicode_tables_are_measured_on_the_reference():
    """`sdlab/data/clip_unicode.txt` is exactly what the installed reference gives, code point
    by code point (classes, lower case, NFC data): regenerate it with
    `python tests/clip_reference.py` if the reference library changes its tables."""
    assert UNICODE_TABLES_PATH.read_text(encoding="utf-8") == unicode_tables_text()


@pytest.mark.parametrize("seed, n_lines", [(0, 6000), (1, 6000)])
def test_generated_corpus_matches_transformers(tok, ref, seed, n_lines):
    """Real text in ~80 languages and its NFD/NFKD/NFKC forms, random code points of all 17
    planes (unassigned and private use too), combining marks, Hangul jamo, controls,
    whitespace runs, emoji sequences, contractions, special tokens, long lines."""
    lines = corpus(n_lines, seed=seed)
    theirs = reference_ids(ref, lines)
    mismatches = [(line, ours) for line, ours, want in zip(lines, map(tok.encode, lines), theirs) if ours != want]
    n_tokens = sum(map(len, theirs))
    print(f"seed {seed}: {len(lines)} lines, {n_tokens} tokens, {len(mismatches)} mismatches")
    assert not mismatches, mismatches[:3]


def test_next_to_code_points_new_in_recent_unicode(tok, ref):
    """The cases of the issue: letters for the `regex` package (Unicode 17), punctuation for
    the reference (Unicode 16), so the end-of-word marker must stay where the reference puts it."""
    lines = ["+\U0003f58f", "a\u0c5cb", "x\U00011de0y", "\U00011de9+", "1\u0c5c", "\ua7ce", "\ua7cb\u1c89"]
    assert [tok.tokenize(line) for line in lines] == [ref.tokenize(line) for line in lines]
    assert tok.tokenize("+\U0003f58f")[0] == "+"


def test_long_words_are_fast_and_equal(tok, ref):
    """BPE costs O(n log n): a 60,000-character word (no spaces, like a Chinese paragraph)."""
    rng = random.Random(0)
    word = "".join(chr(rng.choice([*range(0x4E00, 0x4E80), *range(0x61, 0x7B)])) for _ in range(60_000))
    start = time.perf_counter()
    ours = tok.encode(word)
    assert time.perf_counter() - start < 10
    assert ours == ref(word, add_special_tokens=False).input_ids


def test_bpe_equals_bpe_steps(tok):
    """`bpe` (a heap, one merge at a time) and `bpe_steps` (every occurrence of the best pair at
    once) agree on every word of a corpus, because of a property of CLIP's merges checked here:
    no merge uses a token that only a later merge makes."""
    made_at = {"".join(pair): rank for rank, pair in enumerate(tok.merges)}
    assert len(made_at) == len(tok.merges)  # each token made by one merge only
    assert all(made_at.get(part, -1) < rank for rank, pair in enumerate(tok.merges) for part in pair)
    fresh = load_tokenizer()
    for line in corpus(1500, seed=2):
        fresh.encode(line)
    words = [word for word in fresh.cache if len(word) <= 300]
    assert len(words) > 5000
    assert [tok.bpe_steps(word)[-1].pieces for word in words] == [fresh.bpe(word) for word in words]


def test_nfc_on_combining_sequences(ref):
    """NFC as the reference does it (Unicode 9.0 tables), on dense random runs of marks,
    composition partners and Hangul jamo (U+11A7, the filler below the final consonants, too)."""
    rng = random.Random(3)
    marks = [*range(0x300, 0x370), *range(0x591, 0x5C8), 0x93C, 0x94D, 0x9BE, 0x9D7, 0xB3E, 0xB56, 0xB57,
             0xBBE, 0xBD7, 0xCC2, 0xCD5, 0xCD6, 0xD3E, 0xD57, 0xDCF, 0xDDF, 0x102E, 0x1B35, 0x3099, 0x309A,
             *range(0x1161, 0x1176), *range(0x11A7, 0x11C3), 0x1AB0, 0x1DF6, 0x0D3B, 0x1E944, 0x11930]
    bases = ["a", "e", "o", "u", "s", "A", "\u0915", "\u09c7", "\u0b47", "\u0bc6", "\u0cc6", "\u0d46",
             "\u0dd9", "\u1025", "\u1b05", "\u304b", "\u1100", "\u1112", "\uac00", "\uac01", "\u1e63", "\u00e9",
             "\u0344", "\u1f00", "\u212b", "\U00011935"]
    lines = ["".join(rng.choice(bases) + "".join(chr(rng.choice(marks)) for _ in range(rng.randint(0, 4)))
                     for _ in range(rng.randint(1, 6))) for _ in range(3000)]
    from tokenizers import normalizers

    reference_nfc = normalizers.NFC()
    assert [nfc(line) for line in lines] == [reference_nfc.normalize_str(line) for line in lines]


def test_ids_do_not_depend_on_regex_or_unicodedata(tok):
    """Imported with the `regex` package and `unicodedata` unavailable, sdlab gives the same ids."""
    lines = corpus(300, seed=4)
    code = ("import sys, json; sys.modules['regex'] = None; sys.modules['unicodedata'] = None\n"
            "from sdlab.tokenizer import load_tokenizer\n"
            "tok = load_tokenizer(); lines = json.load(sys.stdin)\n"
            "print(json.dumps([tok.encode(line) for line in lines]))")
    import json

    out = subprocess.run([sys.executable, "-c", code], input=json.dumps(lines), capture_output=True, text=True,
                         check=True, cwd=Path(__file__).parents[1])
    assert json.loads(out.stdout) == [tok.encode(line) for line in lines]


@pytest.mark.parametrize("bad, shown", [
    ("a cat \ud83d", "U+D83D"), ("\udcff", "U+DCFF"), (b"a cat", "bytes"), (None, "NoneType"), (3, "int"),
    (["a cat", None], "prompt 1 of the batch"), (["ok", "x\ud800"], "prompt 1 of the batch"),
])
def test_hostile_prompts_are_refused_naming_prompt(tok, bad, shown):
    with pytest.raises(ArgumentError, match="prompt") as info:
        tok(bad, padding="max_length", max_length=77, truncation=True)
    assert shown in str(info.value)
    if isinstance(bad, (str, bytes)) or bad is None:
        with pytest.raises(ArgumentError, match="prompt"):
            tok.encode(bad)


def test_convert_helpers_are_gone(tok):
    """They were never used: `tok.vocab[...]` and `tok.id_to_token[...]` are the one way."""
    assert not hasattr(tok, "convert_ids_to_tokens") and not hasattr(tok, "convert_tokens_to_ids")


# -------------------------------------------------------------- training-time cleaning


SMART_TEXT = [
    "don’t stop, we’re “almost” there", "it‘s a dog’s life…", "ﬁne ﬂour and ﬀ ligatures",
    "ＦＵＬＬＷＩＤＴＨ ｌｅｔｔｅｒｓ １２３", "tom &amp; jerry &lt;3 &quot;quoted&quot; &#39;apos&#39;",
    "ΟΔΥΣΣΕΥΣ ΚΑΙ ΣΙΣΥΦΟΣ", "naÃ¯ve cafÃ© (mojibake)", "a\u00a0no-break\u2003space", "¼ cup — “best” ever",
    "«Bonjour» ‹ça va› „Guten Tag“", "&amp;amp; twice", "<b>tags</b> &amp; entities", "ｶﾀｶﾅ and ﾊﾝｶｸ",
    "line\u2028separator\u2029paragraph", "\x1b[31mred\x1b[0m terminal codes", "A<|endoftext|>B ‘quoted’",
    "A<|ENDOFTEXT|>B", "ＡＢ＜｜ｅｎｄｏｆｔｅｘｔ｜＞ｃ",
]


def reference_clean_ids(ref, text, clean):
    """transformers 4.19: cut at the special tokens, clean each stretch, tokenize what is left."""
    ids = []
    for part in re.split(r"(<\|startoftext\|>|<\|endoftext\|>)", text):
        ids += [ref.convert_tokens_to_ids(part)] if part in ("<|startoftext|>", "<|endoftext|>") else \
            ref(clean(part), add_special_tokens=False).input_ids
    return ids


@pytest.fixture(scope="session")
def cleaning_sample():
    rng = random.Random(5)
    real = real_lines()
    smart = [line for line in real if re.search("[‘’“”«»„…ﬁﬂＡ-ｚ]|&[a-z#0-9]+;|Σ", line)]
    return SMART_TEXT + smart + rng.sample(real, 3000)


@pytest.mark.parametrize("clean, reference", [("ftfy", training_time_clean), ("openai", openai_clean)])
def test_cleaning_matches_its_reference(ref, cleaning_sample, clean, reference):
    tok = load_tokenizer(clean=clean)
    assert tok.clean == clean
    ours = [tok.encode(line) for line in cleaning_sample]
    assert ours == [reference_clean_ids(ref, line, reference) for line in cleaning_sample]
    plain = load_tokenizer()
    differ = sum(a != plain.encode(line) for a, line in zip(ours, cleaning_sample))
    print(f"clean={clean}: {differ} of {len(cleaning_sample)} real-text lines get other ids than without cleaning")
    assert differ > len(SMART_TEXT) // 2


def test_cleaning_examples():
    tok = load_tokenizer(clean="ftfy")
    plain = load_tokenizer()
    assert tok.tokenize("don’t") == ["don</w>", "'t</w>"] != plain.tokenize("don’t")
    assert tok.encode("ﬁne") == plain.encode("fine") != plain.encode("ﬁne")
    assert tok.encode("ＡＢＣ") == plain.encode("abc") != plain.encode("ＡＢＣ")
    assert tok.encode("ΟΔΥΣΣΕΥΣ") == plain.encode("οδυσσευς") != plain.encode("ΟΔΥΣΣΕΥΣ")  # final ς
    assert tok.encode("tom &amp; jerry") == tok.encode("tom & jerry")
    assert load_tokenizer(clean="openai").encode("&amp;amp;") == tok.encode("&")


def test_default_is_no_cleaning(tok, ref):
    assert tok.clean is None and load_tokenizer().clean is None
    assert CLIPTokenizer().encode("don’t &amp;") == ref("don’t &amp;", add_special_tokens=False).input_ids


def test_cleaning_without_ftfy_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ftfy", None)  # import ftfy now raises ImportError
    with pytest.raises(ArgumentError, match=r"clean='ftfy' needs the ftfy package.*pip install ftfy"):
        load_tokenizer(clean="ftfy")
    with pytest.raises(ArgumentError, match="pip install ftfy"):
        CLIPTokenizer(clean="openai")
    assert load_tokenizer().encode("a cat") == [320, 2368]


@pytest.mark.parametrize("clean", ["FTFY", "nfkc", 1, True])
def test_unknown_cleaning_is_refused(clean):
    with pytest.raises(ArgumentError, match="clean must be None, 'ftfy' or 'openai'"):
        load_tokenizer(clean=clean)
