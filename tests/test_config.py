"""Settings: defaults < YAML < environment < explicit overrides; typos are errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from ttserve.config import ModelConfig, ServerConfig, Settings, load_settings, served_model_name

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_match_the_spec():
    settings = Settings()
    assert settings.retrieval.strategy == "sift" and settings.retrieval.lam is None  # calibrated per embedder
    assert (settings.retrieval.k, settings.retrieval.n) == (200, 50)
    assert settings.datastore.index_type == "flat"


def test_shipped_default_config_loads():
    assert load_settings(CONFIGS / "default.yaml").retrieval == Settings().retrieval


def test_precedence(tmp_path, monkeypatch):
    config = tmp_path / "c.yaml"
    config.write_text("retrieval:\n  lam: 0.5\n  k: 64\ndatastore:\n  index_type: hnsw\n")
    settings = load_settings(config)
    assert (settings.retrieval.lam, settings.retrieval.k, settings.datastore.index_type) == (0.5, 64, "hnsw")
    assert settings.retrieval.n == 50  # untouched keys keep their defaults

    monkeypatch.setenv("TTSERVE_RETRIEVAL__LAM", "0.2")
    settings = load_settings(config)
    assert (settings.retrieval.lam, settings.retrieval.k) == (0.2, 64)  # environment beats YAML

    settings = load_settings(config, retrieval={"k": 10})
    assert (settings.retrieval.lam, settings.retrieval.k) == (0.2, 10)  # explicit beats both, per field


def test_null_in_the_environment_unsets_a_field_as_in_yaml(tmp_path, monkeypatch):
    assert Settings().training.learning_rate_steps == 16
    monkeypatch.setenv("TTSERVE_TRAINING__LEARNING_RATE_STEPS", "null")
    assert Settings().training.learning_rate_steps is None
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  learning_rate_steps: null\n")
    monkeypatch.delenv("TTSERVE_TRAINING__LEARNING_RATE_STEPS")
    assert load_settings(path).training.learning_rate_steps is None


@pytest.mark.parametrize(
    "yaml_text",
    [
        "retrieval:\n  lamda: 0.5\n",
        "retreival:\n  lam: 0.5\n",
        "retrieval:\n  lam: -1\n",
        "datastore:\n  index_type: lsh\n",
    ],
)
def test_bad_config_is_an_error(tmp_path, yaml_text):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml_text)
    with pytest.raises(ValidationError):
        load_settings(config)


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_settings(tmp_path / "nope.yaml")


def test_served_model_name():
    assert served_model_name(Settings()) == "SmolLM2-135M-Instruct"  # the embedded default
    hub = Settings(model=ModelConfig(name_or_path="org/model"))
    assert served_model_name(hub) == "org/model"
    named = hub.model_copy(update={"server": ServerConfig(served_model_name="alias")})
    assert served_model_name(named) == "alias"


def test_the_default_datastore_lives_in_the_cache_one_directory_per_corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("TTSERVE_CACHE_DIR", str(tmp_path))
    assert Settings().datastore.path == tmp_path / "datastores" / "stdlib-docs"
    monkeypatch.setenv("TTSERVE_DATASTORE__CORPUS", "stdlib:sources")
    assert Settings().datastore.path == tmp_path / "datastores" / "stdlib-sources"
    monkeypatch.setenv("TTSERVE_DATASTORE__PATH", str(tmp_path / "mine"))
    assert Settings().datastore.path == tmp_path / "mine"  # an explicit path wins
    with pytest.raises(ValidationError, match="stdlib:docs"):
        Settings(datastore={"corpus": "stdlib:everything"})


def test_the_tiny_config_serves_the_tiny_model_on_its_own_datastore(tmp_path, monkeypatch):
    monkeypatch.setenv("TTSERVE_CACHE_DIR", str(tmp_path))
    settings = load_settings(CONFIGS / "tiny.yaml")
    assert settings.model.name_or_path == "ttserve-tiny" == served_model_name(settings)
    assert settings.datastore.path == tmp_path / "datastores" / "stdlib-sources"
