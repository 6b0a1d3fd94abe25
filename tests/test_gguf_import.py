"""GGUF import: the packaged SmolLM2 becomes a directory that transformers and PEFT load as they load any
model; a missing or corrupt GGUF is a clear error that leaves nothing behind."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from ttserve import cli
from ttserve.config import PACKAGED_MODEL, ModelConfig, Settings, served_model_name
from ttserve.models import GGUFImportError, import_gguf, packaged_gguf, read_model_info, resolve_model
from ttserve.models.gguf_import import imported_directory

pytestmark = pytest.mark.slow


def test_the_imported_directory_is_a_standard_model(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    names = {p.name for p in smollm2_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    assert "quantization_config" not in json.loads((smollm2_dir / "config.json").read_text())
    info = read_model_info(smollm2_dir)
    assert info["name"] == "SmolLM2-135M-Instruct" and info["parameters"] == 134_515_008
    assert info["source"]["sha256"] and info["source"]["bytes"] == packaged_gguf().stat().st_size
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    assert model.dtype == torch.float32 and tokenizer.chat_template
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)  # a real model


def test_peft_trains_and_saves_an_adapter_for_it(smollm2_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ttserve.config import TrainingConfig
    from ttserve.lm import load_model
    from ttserve.training import TestTimeTrainer

    trainer = TestTimeTrainer(
        load_model(ModelConfig(name_or_path=str(smollm2_dir), device="cpu")), TrainingConfig()
    )
    run = trainer.train(["def add(a, b):\n    return a + b\n"], 1, output_dir=tmp_path / "adapter")
    assert run.steps == 1
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(smollm2_dir)
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2_dir), str(tmp_path / "adapter"))


def test_an_imported_gguf_is_not_imported_again(smollm2_dir, monkeypatch):
    import transformers

    def no_reload(*args, **kwargs):
        raise AssertionError("the GGUF was imported a second time")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_reload)
    assert import_gguf(packaged_gguf(), smollm2_dir) == smollm2_dir


def test_names_resolve_to_the_content_addressed_import(smollm2_dir, tmp_path, monkeypatch):
    """`SmolLM2-135M-Instruct` and a path to its .gguf both mean the directory named by the file's digest."""
    monkeypatch.setenv("TTSERVE_CACHE_DIR", str(tmp_path))
    expected = imported_directory(packaged_gguf())
    assert expected.parent == tmp_path / "models" and expected.name.startswith("SmolLM2-135M-Instruct-")
    expected.parent.mkdir(parents=True)
    expected.symlink_to(smollm2_dir)  # as if imported before: no 30 s import here
    assert resolve_model(PACKAGED_MODEL) == str(expected)
    assert resolve_model(str(packaged_gguf())) == str(expected)
    assert resolve_model("org/some-hub-model") == "org/some-hub-model"
    gguf_settings = Settings(model=ModelConfig(name_or_path=str(packaged_gguf())))
    assert served_model_name(gguf_settings) == "SmolLM2-135M-Instruct"


def test_a_missing_or_corrupt_gguf_is_a_clear_error_and_leaves_nothing(tmp_path):
    out = tmp_path / "models" / "imported"
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 a zip, not a model")
    truncated = tmp_path / "truncated.Q4_1.gguf"
    truncated.write_bytes(packaged_gguf().read_bytes()[:4096])  # the header of a real one, cut short
    for path, message in [
        (tmp_path / "absent.gguf", "no such file"),
        (not_gguf, "not a GGUF file"),
        (truncated, "could not read it as a model"),
    ]:
        with pytest.raises(GGUFImportError, match=message):
            import_gguf(path, out)
        assert not out.exists() and not (out.parent.exists() and list(out.parent.iterdir()))
    result = CliRunner().invoke(cli.app, ["model", "import", str(not_gguf)])
    assert result.exit_code == 2 and "not a GGUF file" in result.stderr
