"""Ingest a folder through the real pipeline into a temporary data dir and print JSON.

Usage: python bench/ingest.py PATH [--embedder all-minilm-l6-v2] [--data-dir DIR]

Reports files by final status with reasons, pages/s parsed, chunks/s embedded, and peak
RSS. Embedding speed is also compared, in the same run, with the embedder's own
`SentenceTransformer.encode` on the same chunks (the baseline ratio).
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import func, select

from app.commands import ingest_files
from app.main import build_services
from app.settings import Settings
from app.wiring import build_ingest
from ingest.schema import Chunk, Document


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("path", type=Path)
    parser.add_argument("--embedder", default="all-minilm-l6-v2")
    parser.add_argument("--data-dir", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="ragqa-bench-ingest-"))
    settings = Settings(data_dir=data_dir, embedder=args.embedder, max_upload_mb=1000)
    services = build_services(settings)
    parts = build_ingest(settings, services.sessions)
    start = time.perf_counter()
    outcomes = ingest_files(settings, [args.path], services=services, parts=parts)
    wall = time.perf_counter() - start
    with services.sessions() as session:
        docs = session.execute(select(Document)).scalars().all()
        chunks = session.execute(select(func.count()).select_from(Chunk)).scalar_one()
        sample = list(session.execute(select(Chunk.text).limit(512)).scalars())
    parse_s = sum(d.timings.get("parse_s", 0) for d in docs if d.timings)
    embed_s = sum(d.timings.get("embed_s", 0) for d in docs if d.timings)
    pages = sum((d.page_count or 1) for d in docs if d.status == "ready")
    # Baseline in the same run: the embedder on the same chunk texts, one big batch.
    t = time.perf_counter()
    parts.embedder.embed(sample)
    baseline_cps = len(sample) / (time.perf_counter() - t) if sample else 0.0
    status = {o.status for o in outcomes}
    failures = [{"file": str(o.path), "error": o.error} for o in outcomes if o.status == "failed"]
    crashed = sum(1 for o in outcomes if o.status == "failed" and not o.error)
    result = {
        "files": len(outcomes),
        "ready": sum(1 for o in outcomes if o.status == "ready"),
        "failed": sum(1 for o in outcomes if o.status == "failed"),
        "duplicate": sum(1 for o in outcomes if o.status == "duplicate"),
        "crashed": crashed,
        "statuses": sorted(status),
        "failures": failures,
        "pages": pages,
        "chunks": chunks,
        "pages_per_s": round(pages / parse_s, 1) if parse_s else None,
        "chunks_per_s": round(chunks / embed_s, 1) if embed_s else None,
        "baseline_embed_chunks_per_s": round(baseline_cps, 1),
        "ratio_pipeline_vs_baseline_embed": round((chunks / embed_s) / baseline_cps, 2)
        if embed_s and baseline_cps
        else None,
        "wall_s": round(wall, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "embedder": parts.embedder.name,
        "data_dir": str(data_dir),
    }
    json.dump(result, sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
