"""Fine-tuning the tiny model (`sdlab.tiny.finetune`): textual inversion and LoRA, on short seeded runs.

The full runs (`python -m sdlab finetune`) reach the figures of the report; here a few
hundred steps must already show the effect, measured with the analyzer on generation seeds no
training used, and leave every weight they do not own bit for bit as it was.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sdlab import lora
from sdlab.clip import add_token_embeddings
from sdlab.errors import ArgumentError, CheckpointError
from sdlab.model_loader import DEFAULT_CHECKPOINT, preload_models_from_standard_weights
from sdlab.tiny import analyzer, finetune
from sdlab.tiny.data import SHAPES, Scene, ShapeSpec, concept_scenes, render
from sdlab.tokenizer import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

EVAL_SEEDS = list(range(9000, 9024))  # generation seeds of the checks (the report uses 5000-5059)


def snapshot(models: dict) -> dict:
    return {f"{name}.{key}": value.clone() for name, m in models.items() for key, value in m.state_dict().items()}


def assert_same(models: dict, before: dict, skip: tuple[str, ...] = ()) -> None:
    after = snapshot(models)
    assert after.keys() == before.keys()
    for key, value in before.items():
        if key not in skip:
            assert torch.equal(after[key], value), key


def diamond_rate(models, tokenizer, words: dict, n: int = 24) -> float:
    scenes = concept_scenes(n, seed=77, shape="diamond", size="large")
    return finetune.template_rates(models, tokenizer, scenes, words, EVAL_SEEDS[:n])["shape"]


@pytest.fixture(scope="module")
def models():
    return preload_models_from_standard_weights()


@pytest.fixture(scope="module")
def inversion(models):
    before = snapshot(models)
    result = finetune.train_inversion(models, finetune.InversionSettings(steps=300, lr=0.03))
    assert_same(models, before)  # training reads the models and writes none of their weights
    return result


@pytest.fixture(scope="module")
def lora_run(models):
    before = snapshot(models)
    result = finetune.train_lora(models, finetune.LoraSettings(steps=120))
    assert_same(models, before)  # the adapters ran as hooks, removed again
    return result


# ------------------------------------------------------------------ tokenizer, text encoder, analyzer


def test_added_token_is_one_id_and_other_prompts_keep_theirs():
    plain, extended = load_tokenizer(), load_tokenizer()
    assert extended.add_tokens(["<diamond>"]) == [49408]
    for prompt in ("a large red circle in the center", "a <diamond", "<|endoftext|> diamond>", ""):
        assert extended(prompt).input_ids == plain(prompt).input_ids
    assert extended.encode("a red <diamond>") == plain.encode("a red") + [49408]
    assert extended.encode("<diamond><diamond>x") == [49408, 49408] + plain.encode("x")
    assert extended.decode([320, 49408]) == "a <diamond>"
    assert len(extended) == 49409
    for bad in ("<diamond>", "a b", "", 3):
        with pytest.raises(ArgumentError, match="token"):
            extended.add_tokens([bad])
    assert len(extended) == 49409


def test_added_row_leaves_every_other_output_bit_identical(models):
    clip = preload_models_from_standard_weights()["clip"]
    tokens = torch.tensor(load_tokenizer()(["a small blue square at the top", ""], padding="max_length",
                                           max_length=77).input_ids)
    with torch.no_grad():
        before = clip(tokens)
        rows = clip.embedding.token_embedding.weight.clone()
        assert add_token_embeddings(clip, torch.ones(2, 64)) == [49408, 49409]
        assert torch.equal(clip(tokens), before)
    weight = clip.embedding.token_embedding.weight
    assert torch.equal(weight[:49408], rows) and torch.equal(weight[49408:], torch.ones(2, 64))
    assert clip.config.n_vocab == 49410
    with pytest.raises(ArgumentError, match="vectors"):
        add_token_embeddings(clip, torch.ones(64))


def test_analyzer_reads_diamonds_only_when_asked():
    rng = np.random.default_rng(0)
    for scene in concept_scenes(12, seed=5, shape="diamond", size="large"):
        image = analyzer.degrade(render(scene), rng)
        assert analyzer.detect(image, novel=True)[0].shape == "diamond"
        assert analyzer.detect(image)[0].shape in SHAPES  # the default readings know three shapes
    for shape in SHAPES:  # the trained shapes read the same with novel=True
        for scene in concept_scenes(6, seed=6, shape=shape):
            assert analyzer.detect(render(scene), novel=True) == analyzer.detect(render(scene))
    scene = Scene((ShapeSpec("diamond", "red", "large", "center"),))
    assert analyzer.score(scene, render(scene))["all"] == 1.0


# ------------------------------------------------------------------ textual inversion


def test_inversion_loss_falls(inversion):
    assert inversion["loss_after"] < inversion["loss_before"] / 2, (inversion["loss_before"], inversion["loss_after"])
    assert inversion["vector"].shape == (1, 64)
    assert inversion["captions"][0].count("<diamond>") == 1


def test_learned_token_draws_diamonds_and_nothing_else_changes(inversion):
    models, tokenizer = preload_models_from_standard_weights(), load_tokenizer()
    plain_word = diamond_rate(models, tokenizer, {})
    image_before = finetune.generate(models, tokenizer, ["a large red circle in the center"], [3])
    before = snapshot(models)
    token_id = finetune.add_embedding(models, tokenizer, "<diamond>", inversion["vector"])
    key = "clip.embedding.token_embedding.weight"
    assert_same(models, before, skip=(key,))
    rows = models["clip"].embedding.token_embedding.weight
    assert torch.equal(rows[:token_id], before[key]) and torch.equal(rows[token_id], inversion["vector"][0])
    assert np.array_equal(finetune.generate(models, tokenizer, ["a large red circle in the center"], [3]),
                          image_before)
    learned = diamond_rate(models, tokenizer, {"diamond": "<diamond>"})
    print(f"diamond rate: plain word {plain_word:.3f}, learned token {learned:.3f}")
    assert learned >= 0.2 and learned >= plain_word + 0.15, (learned, plain_word)


def test_embedding_files_round_trip(tmp_path, inversion):
    path = tmp_path / "learned_embeds.safetensors"
    finetune.save_embedding(path, "<diamond>", inversion["vector"])
    assert list(load_file(str(path))) == ["<diamond>"]
    token, vectors = finetune.read_embedding(path)
    assert token == "<diamond>" and torch.equal(vectors, inversion["vector"])
    a1111 = tmp_path / "shiny.safetensors"  # AUTOMATIC1111: one `emb_params`, the token is the file's name
    save_file({"emb_params": inversion["vector"]}, str(a1111))
    assert finetune.read_embedding(a1111)[0] == "shiny"
    fresh, tokenizer = preload_models_from_standard_weights(), load_tokenizer()
    token_id = finetune.load_embedding(fresh, tokenizer, a1111)
    assert tokenizer.encode("a shiny") == [320, token_id]
    assert torch.equal(fresh["clip"].embedding.token_embedding.weight[token_id], inversion["vector"][0])
    save_file({"a": torch.ones(1, 64), "b": torch.ones(1, 64)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(CheckpointError, match="two.safetensors"):
        finetune.read_embedding(tmp_path / "two.safetensors")
    with pytest.raises(ArgumentError, match="vector"):
        finetune.add_embedding(fresh, tokenizer, "<x>", torch.ones(1, 32))


# ------------------------------------------------------------------ LoRA


def test_lora_loss_falls_and_file_is_kohya(tmp_path, models, lora_run):
    assert lora_run["loss_after"] < lora_run["loss_before"] / 1.5, (lora_run["loss_before"], lora_run["loss_after"])
    path = tmp_path / "diamond-lora.safetensors"
    lora.save_lora(models, lora_run["adapters"], path)
    state = load_file(str(path))
    assert len(state) == 3 * 80
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight" in state
    assert all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))
               for k in state)
    assert all(torch.equal(state[k], v) for k, v in lora.lora_state_dict(models, lora_run["adapters"]).items())
    parsed = {(a.target.model, a.target.module, a.target.chunk): a for a in lora.parse_lora(state, models)}
    assert len(parsed) == len(lora_run["adapters"])
    for mine in lora_run["adapters"]:
        read = parsed[mine.target.model, mine.target.module, mine.target.chunk]
        assert mine.alpha == read.alpha == 4.0
        assert torch.equal(mine.down, read.down) and torch.equal(mine.up, read.up)


def test_lora_draws_diamonds_and_removes_exactly(tmp_path, models, lora_run):
    tokenizer = load_tokenizer()
    path = tmp_path / "diamond-lora.safetensors"
    lora.save_lora(models, lora_run["adapters"], path)
    without = diamond_rate(models, tokenizer, {})
    before = snapshot(models)
    handle = lora.load_lora(models, path, fuse=False)  # beside the weights: they stay untouched
    assert_same(models, before)
    with_lora = diamond_rate(models, tokenizer, {})
    handle.remove()
    print(f"diamond rate: without the LoRA {without:.3f}, with it {with_lora:.3f}")
    # a short run (the fixture's steps): the direction; the shipped full run's file is held to more below
    assert with_lora >= 0.15 and with_lora >= without + 0.15, (with_lora, without)
    handle = lora.load_lora(models, path, keep_original=True)  # merged: removing restores bit for bit
    assert not torch.equal(snapshot(models)["diffusion.unet.encoders.1.1.attention_2.k_proj.weight"],
                           before["diffusion.unet.encoders.1.1.attention_2.k_proj.weight"])
    handle.remove()
    assert_same(models, before)


# ------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize(("settings", "name"), [
    (finetune.InversionSettings(steps=0), "steps"),
    (finetune.InversionSettings(lr=float("nan")), "lr"),
    (finetune.InversionSettings(shape="hexagon"), "shape"),
    (finetune.InversionSettings(init_word="a square"), "init_word"),
    (finetune.InversionSettings(token="<|endoftext|>"), "token"),
    (finetune.LoraSettings(rank=0), "rank"),
    (finetune.LoraSettings(batch=True), "batch"),
    (finetune.LoraSettings(shape="star"), "shape"),
])
def test_bad_settings_name_the_setting(models, settings, name):
    train = finetune.train_inversion if isinstance(settings, finetune.InversionSettings) else finetune.train_lora
    before = snapshot(models)
    with pytest.raises(ArgumentError, match=name):
        train(models, settings)
    assert_same(models, before)
    with pytest.raises(ArgumentError, match="settings"):
        train(models, object())


def test_report_arguments_are_checked(tmp_path):
    with pytest.raises(ArgumentError, match="out_dir"):
        finetune.run_finetune(tmp_path / "missing")
    with pytest.raises(ArgumentError, match="n_eval"):
        finetune.run_finetune(tmp_path, n_eval=0)
    earlier = tmp_path / finetune.OUTPUT_FILES[1]
    earlier.write_bytes(b"a LoRA from an earlier run")
    with pytest.raises(ArgumentError, match="exist already.*--overwrite"):
        finetune.run_finetune(tmp_path, n_eval=1)
    assert earlier.read_bytes() == b"a LoRA from an earlier run"  # refused before any work, nothing replaced


def test_command_line_names_bad_settings_in_one_line(tmp_path, capsys):
    """`python -m sdlab finetune`: a bad setting ends in one line on stderr and status 2, before any training."""
    from sdlab.__main__ import main

    assert main(["finetune", "--out-dir", str(tmp_path / "missing"), "--n-eval", "4"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error:") and "out_dir" in error and "\n" not in error


def test_shipped_files_do_what_the_report_says():
    """The files of `python -m sdlab finetune` in sdlab/data (chapter 9 reads them), on scenes and seeds of
    this test's own: the report's direction holds (the LoRA draws diamonds and keeps circles; the token
    asks for diamonds more often than the plain word)."""
    import json

    data = DEFAULT_CHECKPOINT.parent
    report = json.loads((data / "finetune_report.json").read_text())
    assert {report["textual_inversion"]["file"], report["lora"]["file"]} == set(finetune.OUTPUT_FILES)
    models, tokenizer = preload_models_from_standard_weights(), load_tokenizer()
    plain_word = diamond_rate(models, tokenizer, {})
    circles = concept_scenes(24, seed=78, shape="circle", size="large")
    handle = lora.load_lora(models, data / finetune.OUTPUT_FILES[1], fuse=False)
    with_lora = diamond_rate(models, tokenizer, {})
    circles_kept = finetune.template_rates(models, tokenizer, circles, {}, EVAL_SEEDS[:24])["all"]
    handle.remove()
    finetune.load_embedding(models, tokenizer, data / finetune.OUTPUT_FILES[0])
    learned = diamond_rate(models, tokenizer, {"diamond": "<diamond>"})
    print(f"diamonds: plain word {plain_word:.2f}, LoRA {with_lora:.2f}, token {learned:.2f}; circles kept {circles_kept:.2f}")
    assert with_lora >= 0.5 and circles_kept >= 0.85 and learned >= plain_word + 0.15, (with_lora, circles_kept, learned)
