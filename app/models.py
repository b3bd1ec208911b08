"""`ragqa models`: one view over generator and embedder presets, for listing and pulling."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app.settings import Settings
from generation.presets import GENERATOR_PRESETS
from generation.provision import ModelPackageMissing, locate_parts, provisioned_path, pull_preset
from ingest.embed import EMBEDDER_PRESETS, EmbedderError, locate_embedder


def list_models(settings: Settings) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for preset in GENERATOR_PRESETS.values():
        if provisioned_path(preset.name, settings.resolved_model_dir) is not None:
            state = "ready"
        else:
            try:
                locate_parts(preset)
                state = "installed"  # packages present, `pull` will convert
            except ModelPackageMissing:
                state = "not installed"
        rows.append(
            {
                "name": preset.name,
                "role": "generator",
                "state": state,
                "description": preset.description,
                "default": preset.name == settings.generator,
            }
        )
    for emb in EMBEDDER_PRESETS.values():
        try:
            locate_embedder(emb.name)
            state = "ready"
        except EmbedderError:
            state = "not installed"
        rows.append(
            {
                "name": emb.name,
                "role": "embedder",
                "state": state,
                "description": emb.description,
                "default": emb.name == settings.embedder,
            }
        )
    return rows


def pull_model(settings: Settings, name: str) -> str:
    """Provision one model; returns a line for the user."""
    if name in GENERATOR_PRESETS:
        result = pull_preset(name, settings.resolved_model_dir)
        verb = "provisioned" if result.created else "already provisioned"
        return f"{name}: {verb} at {result.path}"
    if name in EMBEDDER_PRESETS:
        _, folder = locate_embedder(name)
        where = f" at {folder}" if folder else ""
        return f"{name}: installed{where} (embedders load straight from their package)"
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise EmbedderError(f"{path} has no config.json: not a transformers model folder")
        return f"{path}: local transformers folder, nothing to pull"
    raise EmbedderError(
        f"unknown model {name!r}: presets are "
        f"{', '.join(sorted([*GENERATOR_PRESETS, *EMBEDDER_PRESETS]))}; or give a local folder"
    )
