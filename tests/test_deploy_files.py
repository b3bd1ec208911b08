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


def test_extras_named_by_makefile_dockerfile_and_readme_exist_in_normalised_form():
    # pip 23 does not normalise a requested extra ("a_b" is not "a-b"), while setuptools
    # publishes the normalised name: a non-normalised name installs nothing, silently.
    import re
    import tomllib

    extras = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    )
    for name in extras:
        assert name == re.sub(r"[-_.]+", "-", name).lower(), f"extra {name!r} is not normalised"
    requested: set[str] = set()
    for file in ("Makefile", "Dockerfile", "README.md"):
        text = (ROOT / file).read_text()
        for group in re.findall(r"\.\[([a-z0-9_,.-]+)\]", text):
            requested.update(group.split(","))
        for group in re.findall(r'MODEL_EXTRAS="([a-z0-9_,.-]+)"', text):
            requested.update(group.split(","))
    assert requested, "no extras found in Makefile/Dockerfile/README"
    assert requested <= extras, f"unknown extras {sorted(requested - extras)}"


def test_kernel_source_ships_in_the_package_and_the_image_can_compile_it():
    import tomllib

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = data["tool"]["setuptools"]["package-data"]["generation"]
    sources = [p for p in (ROOT / "generation").rglob("*.cpp")]
    assert sources, "no kernel source found"
    for source in sources:
        rel = source.relative_to(ROOT / "generation")
        assert any(rel.match(pattern) for pattern in patterns), f"{rel} is not package data"
    assert "ninja==" in (ROOT / "pyproject.toml").read_text()
    assert "g++" in (ROOT / "Dockerfile").read_text()
