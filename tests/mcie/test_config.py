"""Settings come from the environment and mcie.toml, derive their defaults, mask secrets and fail clearly."""

from __future__ import annotations

import pytest

from mcie.config import ConfigError, get_settings, load_settings


def test_defaults_follow_the_data_dir(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("MCIE_DATABASE_URL")
    monkeypatch.setenv("MCIE_DATA_DIR", str(tmp_path / "d"))
    settings = load_settings()
    assert settings.database_url == f"sqlite:///{tmp_path}/d/mcie.db"
    assert settings.blob_url == str((tmp_path / "d" / "blobs").resolve())
    assert settings.mllm_backend == "none"


def test_environment_and_toml_file(monkeypatch, tmp_path) -> None:
    toml = tmp_path / "mcie.toml"
    toml.write_text('mllm_backend = "openai"\nmllm_concurrency = 32\nmllm_model = "from-toml"\n')
    monkeypatch.setenv("MCIE_CONFIG", str(toml))
    monkeypatch.setenv("MCIE_MLLM_MODEL", "from-env")
    settings = load_settings()
    assert settings.mllm_backend == "openai"
    assert settings.mllm_concurrency == 32
    assert settings.mllm_model == "from-env"  # the environment wins over the file


def test_missing_config_file_named(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("MCIE_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError, match="MCIE_CONFIG"):
        load_settings()


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("MCIE_DATABASE_URL", "mysql://u@h/db", "must be sqlite or postgresql"),
        ("MCIE_DATABASE_URL", "not a url", "not a database URL"),
        ("MCIE_MLLM_CONCURRENCY", "lots", "valid integer"),
        ("MCIE_MLLM_CONCURRENCY", "0", "greater than or equal to 1"),
        ("MCIE_MLLM_BACKEND", "gpt", "'none', 'openai', 'vllm' or 'transformers'"),
        ("MCIE_MLLM_BASE_URL", "ftp://x", "http:// or https://"),
    ],
)
def test_bad_values_name_the_setting(monkeypatch, name, value, expected) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert name in str(info.value)
    assert expected in str(info.value)


def test_unknown_key_in_toml_is_refused(monkeypatch, tmp_path) -> None:
    toml = tmp_path / "mcie.toml"
    toml.write_text("mllm_bakend = 'openai'\n")
    monkeypatch.setenv("MCIE_CONFIG", str(toml))
    with pytest.raises(ConfigError, match="MCIE_MLLM_BAKEND: is not a known setting"):
        load_settings()


def test_secrets_are_masked(monkeypatch) -> None:
    monkeypatch.setenv("MCIE_MLLM_API_KEY", "sk-very-secret")
    monkeypatch.setenv("MCIE_DATABASE_URL", "postgresql+psycopg://app:hunter22@db.example/mcie")
    get_settings.cache_clear()
    shown = get_settings().shown()
    text = repr(shown)
    assert "sk-very-secret" not in text and "hunter22" not in text
    assert shown["MCIE_MLLM_API_KEY"] == "********"
    assert "app:***@db.example" in shown["MCIE_DATABASE_URL"]


def test_storage_options_must_be_a_json_object(monkeypatch) -> None:
    monkeypatch.setenv("MCIE_BLOB_STORAGE_OPTIONS", '["not", "an", "object"]')
    with pytest.raises(ConfigError, match="MCIE_BLOB_STORAGE_OPTIONS"):
        load_settings().storage_options()
    monkeypatch.setenv("MCIE_BLOB_STORAGE_OPTIONS", '{"anon": true}')
    assert load_settings().storage_options() == {"anon": True}
