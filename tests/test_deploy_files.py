"""docker-compose.yml and the Dockerfile cannot run here; check what can be read."""

from pathlib import Path

import yaml

from app.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_has_api_worker_and_postgres_with_healthchecks():
    services = _compose()["services"]
    assert {"api", "worker", "postgres"} <= services.keys()
    for name in ("api", "worker", "postgres"):
        assert "healthcheck" in services[name], name
    assert services["api"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_compose_ragqa_variables_are_real_settings():
    fields = {f"RAGQA_{name.upper()}" for name in Settings.model_fields}
    for name, service in _compose()["services"].items():
        env = service.get("environment", {})
        for key in env:
            if key.startswith("RAGQA_"):
                assert key in fields, f"{name} sets {key}, which is not a setting"


def test_api_and_worker_share_the_data_volume_and_database():
    services = _compose()["services"]
    for name in ("api", "worker"):
        assert "ragqa-data:/data" in services[name]["volumes"]
        assert services[name]["environment"]["RAGQA_DATA_DIR"] == "/data"
        assert services[name]["environment"]["RAGQA_DATABASE_URL"].startswith("postgresql")
    assert services["worker"]["command"] == ["ragqa", "worker"]


def test_dockerfile_pins_torch_and_sets_settings_that_exist():
    text = (ROOT / "Dockerfile").read_text()
    assert "torch==2.13.0" in text
    fields = {f"RAGQA_{name.upper()}" for name in Settings.model_fields}
    for token in text.replace("\\", " ").split():
        if token.startswith("RAGQA_") and "=" in token:
            assert token.split("=", 1)[0] in fields, token
