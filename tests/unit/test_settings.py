"""Settings: defaults, then the YAML file, then TUNEWATCH_* variables; bad values named plainly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tunewatch.settings import SettingsError, load_settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's own TUNEWATCH_* variables must not leak into these tests."""
    for name in list(os.environ):
        if name.startswith("TUNEWATCH_"):
            monkeypatch.delenv(name)


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tunewatch.yaml"
    path.write_text(text)
    return path


def test_without_a_file_the_defaults_hold() -> None:
    settings = load_settings()
    assert settings.gateway.port == 8000
    assert settings.engine.device == "cpu"
    assert settings.store_url == f"sqlite:///{settings.state_dir / 'tunewatch.db'}"


def test_the_yaml_file_sets_nested_values(tmp_path: Path) -> None:
    config = write_yaml(
        tmp_path, "gateway:\n  port: 8500\n  host: 0.0.0.0\nengine:\n  max_loras: 8\n"
    )
    settings = load_settings(config)
    assert (settings.gateway.port, settings.gateway.host) == (8500, "0.0.0.0")
    assert settings.engine.max_loras == 8


def test_an_environment_variable_overrides_the_file_and_keeps_its_siblings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_yaml(tmp_path, "gateway:\n  port: 8500\n  host: 0.0.0.0\n")
    monkeypatch.setenv("TUNEWATCH_GATEWAY__PORT", "9000")
    settings = load_settings(config)
    assert settings.gateway.port == 9000
    assert settings.gateway.host == "0.0.0.0"


def test_an_environment_variable_alone_sets_a_nested_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNEWATCH_GATEWAY__PORT", "9001")
    assert load_settings().gateway.port == 9001


def test_the_database_url_replaces_the_sqlite_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNEWATCH_DATABASE_URL", "postgresql+psycopg://db/tunewatch")
    assert load_settings().store_url == "postgresql+psycopg://db/tunewatch"


def test_a_bad_value_in_the_file_is_named_with_its_field_and_value(tmp_path: Path) -> None:
    config = write_yaml(tmp_path, "gateway:\n  port: 70000\n")
    with pytest.raises(SettingsError) as caught:
        load_settings(config)
    assert "gateway.port" in str(caught.value)
    assert "70000" in str(caught.value)


def test_a_bad_value_in_the_environment_is_named_with_its_field_and_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TUNEWATCH_GATEWAY__PORT", "eighty")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert "gateway.port" in str(caught.value)
    assert "'eighty'" in str(caught.value)


def test_every_bad_value_is_named_at_once(tmp_path: Path) -> None:
    config = write_yaml(tmp_path, "engine:\n  device: tpu\nlog_level: LOUD\n")
    with pytest.raises(SettingsError) as caught:
        load_settings(config)
    message = str(caught.value)
    assert "engine.device" in message and "'tpu'" in message
    assert "log_level" in message and "'LOUD'" in message


def test_an_unknown_key_in_a_section_is_refused(tmp_path: Path) -> None:
    config = write_yaml(tmp_path, "gateway:\n  prot: 9000\n")
    with pytest.raises(SettingsError, match=r"gateway\.prot"):
        load_settings(config)


def test_an_unknown_top_level_key_is_refused(tmp_path: Path) -> None:
    config = write_yaml(tmp_path, "gatway:\n  port: 9000\n")
    with pytest.raises(SettingsError, match="gatway"):
        load_settings(config)


def test_a_missing_file_is_a_settings_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.yaml"
    with pytest.raises(SettingsError, match="nowhere.yaml"):
        load_settings(missing)


def test_a_file_that_is_not_yaml_is_a_settings_error(tmp_path: Path) -> None:
    config = write_yaml(tmp_path, "gateway: [port: 1\n")
    with pytest.raises(SettingsError, match="not valid YAML"):
        load_settings(config)


def test_a_file_without_a_mapping_at_the_top_is_a_settings_error(tmp_path: Path) -> None:
    config = write_yaml(tmp_path, "- port: 9000\n")
    with pytest.raises(SettingsError, match="mapping"):
        load_settings(config)


def test_an_empty_file_means_the_defaults(tmp_path: Path) -> None:
    assert load_settings(write_yaml(tmp_path, "")).gateway.port == 8000


def test_secrets_do_not_show_in_the_settings_repr(tmp_path: Path) -> None:
    config = write_yaml(tmp_path, "gateway:\n  admin_token: hunter2\n  api_keys: [sk-abc]\n")
    settings = load_settings(config)
    assert settings.gateway.admin_token is not None
    assert settings.gateway.admin_token.get_secret_value() == "hunter2"
    assert "hunter2" not in repr(settings) and "sk-abc" not in repr(settings)


def test_a_mistyped_secret_is_named_without_echoing_its_value(tmp_path: Path) -> None:
    config = write_yaml(tmp_path, "gateway:\n  admin_token: 123456789\n  api_keys: [987654321]\n")
    with pytest.raises(SettingsError) as caught:
        load_settings(config)
    message = str(caught.value)
    assert "gateway.admin_token" in message and "gateway.api_keys.0" in message
    assert "123456789" not in message and "987654321" not in message


def test_an_empty_admin_token_or_api_key_is_refused_by_name(tmp_path: Path) -> None:
    config = write_yaml(tmp_path, "gateway:\n  admin_token: ''\n  api_keys: ['']\n")
    with pytest.raises(SettingsError) as caught:
        load_settings(config)
    assert "gateway.admin_token" in str(caught.value)
    assert "gateway.api_keys.0" in str(caught.value)


def test_the_generated_admin_token_file_is_private_and_refused_when_empty_or_shared(
    tmp_path: Path,
) -> None:
    from tunewatch.settings import Settings
    from tunewatch.stack import admin_token

    settings = Settings(state_dir=tmp_path)
    token = admin_token(settings)
    token_file = tmp_path / "admin-token"
    assert len(token) >= 32 and token_file.stat().st_mode & 0o777 == 0o600
    token_file.chmod(0o644)
    with pytest.raises(SettingsError, match="chmod 600"):
        admin_token(settings)
    token_file.chmod(0o600)
    token_file.write_text("\n")
    with pytest.raises(SettingsError, match="is empty"):
        admin_token(settings)
