"""The embedded default LM (ttserve/models/tiny.py), exercised with the quick preset.

The quick model is built once per module (a few seconds on 2 cores); the reproducibility test builds it a
second time, the interruption test a third time on a smaller corpus and stops it early.
"""

from __future__ import annotations

import hashlib
import math
import sysconfig
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ttserve.models import tiny
from ttserve.models.tiny import (
    ASSISTANT,
    BOS,
    EOS,
    MODEL_INFO_FILE,
    USER,
    TinyModelConfig,
    build_tiny_model,
    default_model_dir,
    ensure_tiny_model,
    read_model_info,
)
from ttserve.stdlib_corpus import EXCLUDED_DIRS, GENERATED_DIRS, pretraining_files

QUICK = TinyModelConfig.quick()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The quick model is too small to gain much from a second thread, and with two a build slows down up to
    # tenfold while another process is busy on the same two cores (the OpenMP threads wait on each other).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "quick", QUICK, progress=False)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def test_loads_with_the_auto_classes(model, tokenizer):
    config = model.config
    assert config.model_type == "llama"
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (64, 2, 1)
    assert config.head_dim == 64
    assert model.dtype == torch.float32
    assert config.vocab_size == len(tokenizer) == QUICK.vocab_size
    # Tied embeddings: the output projection is the input embedding matrix.
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert tokenizer.model_max_length == QUICK.max_position_embeddings


@pytest.mark.parametrize(
    "text",
    [
        "def f(x):\n    return {'a': [1, 2.5e-3]}  # tabs\tand\r\nCRLF",
        "emoji 🎉🐍👩‍💻 and Chinese 你好，世界 and naïve café",
        "   leading and trailing spaces   ",
        "\x00\x7f control bytes and \u200b zero width",
        "",
    ],
)
def test_tokenizer_round_trips_any_utf8(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id  # prompts start like every pretraining document
    assert tokenizer.unk_token_id is None or tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_chat_template_renders(tokenizer):
    messages = [
        {"role": "system", "content": "You write Python."},
        {"role": "user", "content": "Reverse a list."},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (f"{BOS}<|system|>\nYou write Python.{EOS}{USER}\nReverse a list.{EOS}{ASSISTANT}\n")
    without_prompt = tokenizer.apply_chat_template(messages, tokenize=False)
    assert not without_prompt.endswith(f"{ASSISTANT}\n")
    # The role markers are single special tokens, and the template's <|bos|> is not doubled.
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tokenizer.convert_tokens_to_ids(USER)) == 1
    assert ids.count(tokenizer.bos_token_id) == 1
    with pytest.raises(Exception, match="unknown chat role"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_validation_loss_is_well_below_uniform(model_dir):
    training = read_model_info(model_dir)["training"]
    uniform = math.log(QUICK.vocab_size)
    assert training["uniform_loss"] == pytest.approx(uniform)
    assert training["final_val_loss"] < uniform - 1.0
    assert 0 < training["val_bits_per_byte"] < 3.5
    assert training["val_blocks"] > 0 and training["train_blocks"] > 40 * training["val_blocks"]


def test_generation_runs(model, tokenizer):
    inputs = tokenizer("import os\n\ndef ", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 12 or out[0, -1] == tokenizer.eos_token_id
    assert isinstance(tokenizer.decode(out[0], skip_special_tokens=True), str)


def test_info_records_config_and_corpus_fingerprint(model_dir):
    info = read_model_info(model_dir)
    assert info["format_version"] == tiny.FORMAT_VERSION
    assert TinyModelConfig(**info["config"]) == QUICK
    corpus = info["corpus"]
    files = [Path(f["path"]) for f in corpus["files"]]
    assert corpus["python_version"] and files
    # Only package sources: no top-level module (those are the datastore's), no tests or vendored code.
    assert all(len(f.parts) >= 2 for f in files)
    assert not any(set(f.parts) & (EXCLUDED_DIRS | GENERATED_DIRS) for f in files)
    assert sum(f["bytes"] for f in corpus["files"]) == corpus["total_bytes"] <= QUICK.max_corpus_bytes
    root = Path(sysconfig.get_paths()["stdlib"])
    assert [root / f for f in files] == pretraining_files(QUICK.max_corpus_bytes)
    digest = hashlib.sha256(b"".join((root / f).read_bytes() for f in files)).hexdigest()
    assert corpus["sha256"] == digest
    assert set(info["versions"]) >= {"torch", "transformers", "tokenizers"}


def test_a_second_build_is_identical(model_dir, tmp_path):
    again = build_tiny_model(tmp_path / "again", QUICK, progress=False)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (again / name).read_bytes() == (model_dir / name).read_bytes(), name
    first, second = load_file(model_dir / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(second[key], first[key], rtol=1e-5, atol=1e-6)
    assert read_model_info(again)["corpus"] == read_model_info(model_dir)["corpus"]


def test_an_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    real_step, calls = tiny._train_step, []

    def step_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(tiny, "_train_step", step_then_interrupt)
    out = tmp_path / "models" / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        build_tiny_model(out, TinyModelConfig.quick(max_corpus_bytes=200_000), progress=False)
    assert len(calls) == 3
    assert not out.exists()
    assert list(out.parent.iterdir()) == []  # no staging directory left beside it


def test_build_refuses_an_existing_directory(tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError):
        build_tiny_model(tmp_path / "taken", QUICK, progress=False)


def test_ensure_reuses_a_built_model(model_dir, monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("ensure_tiny_model rebuilt an existing model")

    monkeypatch.setattr(tiny, "build_tiny_model", no_build)
    assert ensure_tiny_model(model_dir, QUICK, progress=False) == model_dir
    with pytest.raises(ValueError, match="different config"):
        ensure_tiny_model(model_dir, TinyModelConfig.quick(seed=1), progress=False)


def test_default_dir_is_in_the_cache_and_keyed_by_config(tmp_path, monkeypatch):
    monkeypatch.setenv("TTSERVE_CACHE_DIR", str(tmp_path))
    default = default_model_dir()
    assert default.parent == tmp_path / "models"
    assert default.name.startswith("tiny-stdlib-")
    assert default == default_model_dir(TinyModelConfig())
    assert default_model_dir(QUICK) != default
    assert not (default / MODEL_INFO_FILE).exists()


def test_config_rejects_inconsistent_values():
    with pytest.raises(ValueError):
        TinyModelConfig(hidden_size=100, num_heads=3)
    with pytest.raises(ValueError):
        TinyModelConfig(seq_len=2048)
    with pytest.raises(ValueError):
        TinyModelConfig(unknown_field=1)
    assert TinyModelConfig().head_dim == 64 and QUICK.head_dim == 64
