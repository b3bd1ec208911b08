from pathlib import Path

import pytest
from pydantic import ValidationError

from app.settings import ApiKeys, Settings
from app.wiring import answerable_threshold


def test_settings_read_ragqa_environment_variables(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAGQA_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("RAGQA_PORT", "9123")
    monkeypatch.setenv("RAGQA_MAX_UPLOAD_MB", "7")
    monkeypatch.setenv("RAGQA_GENERATOR", "qwen2.5-coder-0.5b-instruct")
    monkeypatch.setenv("RAGQA_API_KEYS", "alpha, admin:omega ,")
    s = Settings()
    assert s.port == 9123
    assert s.max_upload_bytes == 7 * 1024 * 1024
    assert s.generator == "qwen2.5-coder-0.5b-instruct"
    assert s.keys.user == ["alpha"] and s.keys.admin == ["omega"]
    assert s.resolved_database_url == f"sqlite:///{(tmp_path / 'd').resolve()}/ragqa.db"


def test_settings_read_dotenv_file(monkeypatch, tmp_path):
    monkeypatch.delenv("RAGQA_PORT", raising=False)
    monkeypatch.chdir(tmp_path)
    Path(".env").write_text("RAGQA_PORT=8765\nRAGQA_EMBEDDER=use-multilingual-v3\n")
    s = Settings()
    assert s.port == 8765
    assert s.embedder == "use-multilingual-v3"


def test_invalid_port_is_rejected_with_the_field_name(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAGQA_PORT", "70000")
    with pytest.raises(ValidationError, match="port"):
        Settings()


def test_overlap_not_smaller_than_chunk_size_is_rejected(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValidationError, match="chunk_overlap must be < chunk_tokens"):
        Settings(chunk_tokens=64, chunk_overlap=64)


def test_empty_admin_key_is_rejected():
    with pytest.raises(ValueError, match="empty admin key"):
        ApiKeys("user1,admin:")


@pytest.mark.parametrize(
    ("host", "keys", "insecure", "allowed"),
    [
        ("127.0.0.1", "", False, True),
        ("localhost", "", False, True),
        ("::1", "", False, True),
        ("0.0.0.0", "", False, False),
        ("0.0.0.0", "k1", False, True),
        ("0.0.0.0", "", True, True),
    ],
)
def test_non_loopback_bind_needs_keys_or_explicit_insecure(
    monkeypatch, tmp_path, host, keys, insecure, allowed
):
    monkeypatch.chdir(tmp_path)
    s = Settings(host=host, api_keys=keys, allow_insecure=insecure)
    if allowed:
        s.check_bind_allowed()
    else:
        with pytest.raises(ValueError, match="RAGQA_ALLOW_INSECURE"):
            s.check_bind_allowed()


def test_answerability_threshold_defaults_to_the_one_measured_for_the_generator(
    monkeypatch, tmp_path
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAGQA_ANSWERABLE_THRESHOLD", raising=False)
    assert answerable_threshold(Settings(generator="qwen2.5-coder-1.5b-instruct")) == 0.65
    # never measured for the 0.5B (or a local folder): the check is off
    assert answerable_threshold(Settings(generator="qwen2.5-coder-0.5b-instruct")) == 0.0
    assert answerable_threshold(Settings(generator=str(tmp_path))) == 0.0
    monkeypatch.setenv("RAGQA_ANSWERABLE_THRESHOLD", "0.4")
    assert answerable_threshold(Settings(generator="qwen2.5-coder-0.5b-instruct")) == 0.4


def test_prefill_weights_setting_is_read_and_unknown_values_are_rejected(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAGQA_PREFILL_WEIGHTS", "quantized")
    assert Settings().prefill_weights == "quantized"
    monkeypatch.setenv("RAGQA_PREFILL_WEIGHTS", "int8")
    with pytest.raises(
        ValidationError, match=r"prefill_weights[\s\S]*'auto', 'float', 'quantized' or 'integer'"
    ):
        Settings()
