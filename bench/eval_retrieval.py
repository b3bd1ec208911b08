"""Retrieval quality on a BEIR-format folder, through the real ingestion pipeline and retriever.

Usage: python bench/eval_retrieval.py DIR [--limit N] [--out FILE] [--data-dir DIR]

DIR holds corpus.jsonl, queries.jsonl and qrels/test.tsv. Every corpus entry becomes one
document in a temporary data dir; every test query is run in dense, lexical and hybrid
mode (and reranked when RAGQA_RERANKER names a cross-encoder folder). Prints JSON with
nDCG@10, Recall@10, Recall@100, MRR@10 and latency p50/p95 per mode.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import select
from stats import percentile  # bench/stats.py, beside this script

from app.commands import ingest_items
from app.main import build_services
from app.settings import Settings
from app.wiring import build_ingest, build_retriever
from ingest.schema import Document


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    with path.open(encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            parts = line.rstrip("\n").split("\t")
            if i == 0 and not parts[-1].lstrip("-").isdigit():
                continue  # header
            qid, did, score = parts[0], parts[1], int(parts[2])
            if score > 0:
                qrels.setdefault(qid, {})[did] = score
    return qrels


def ndcg_at(ranked: list[str], rels: dict[str, int], k: int) -> float:
    dcg = sum(rels.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranked[:k]))
    ideal = sorted(rels.values(), reverse=True)[:k]
    idcg = sum(r / math.log2(i + 2) for i, r in enumerate(ideal))
    return dcg / idcg if idcg else 0.0


def recall_at(ranked: list[str], rels: dict[str, int], k: int) -> float:
    return len(set(ranked[:k]) & set(rels)) / len(rels) if rels else 0.0


def mrr_at(ranked: list[str], rels: dict[str, int], k: int) -> float:
    for i, d in enumerate(ranked[:k]):
        if d in rels:
            return 1.0 / (i + 1)
    return 0.0


def ingest_corpus(settings: Settings, corpus: list[dict]):  # type: ignore[no-untyped-def]
    services = build_services(settings)
    parts = build_ingest(settings, services.sessions)
    items = (
        (
            Path(f"{c['_id']}.txt"),
            f"{c['_id']}.txt",
            (c.get("text") or c.get("title") or " ").encode("utf-8"),
            {"source_id": str(c["_id"]), "title": c.get("title") or ""},
        )
        for c in corpus
    )
    start = time.perf_counter()
    ingest_items(settings, items, services=services, parts=parts)
    ingest_s = time.perf_counter() - start
    with services.sessions() as session:
        rows = session.execute(select(Document.id, Document.meta)).all()
    source_of = {doc_id: (meta or {}).get("source_id") for doc_id, meta in rows}
    return services, parts, source_of, ingest_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dir", type=Path)
    parser.add_argument("--limit", type=int, default=0, help="Evaluate only the first N queries.")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--embedder", default=None)
    parser.add_argument("--rrf-k", type=int, default=None, help="RRF constant (default 60).")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    corpus = read_jsonl(args.dir / "corpus.jsonl")
    queries = {str(q["_id"]): q["text"] for q in read_jsonl(args.dir / "queries.jsonl")}
    qrels = read_qrels(args.dir / "qrels" / "test.tsv")
    test_ids = [q for q in qrels if q in queries]
    if args.limit:
        test_ids = test_ids[: args.limit]
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="ragqa-eval-retrieval-"))
    overrides = {"data_dir": data_dir, "max_upload_mb": 1000}
    if args.embedder:
        overrides["embedder"] = args.embedder
    settings = Settings(**overrides)
    services, parts, source_of, ingest_s = ingest_corpus(settings, corpus)
    retriever = build_retriever(settings, services.sessions, parts)
    if args.rrf_k is not None:
        retriever.rrf_k = args.rrf_k
    modes = ["dense", "lexical", "hybrid"]
    result: dict[str, object] = {"queries": len(test_ids), "corpus_size": len(corpus)}
    retriever.lexical.ensure(parts.index.version, wait=True)
    for mode in modes:
        scores: dict[str, list[float]] = {"ndcg@10": [], "recall@10": [], "recall@100": []}
        scores["mrr@10"] = []
        latencies = []
        for qid in test_ids:
            start = time.perf_counter()
            found = retriever.search(queries[qid], top_k=100, mode=mode, candidates=100)
            latencies.append((time.perf_counter() - start) * 1000)
            ranked: list[str] = []
            for p in found.passages:  # one corpus entry may have several chunks
                sid = source_of.get(p.document_id)
                if sid is not None and sid not in ranked:
                    ranked.append(sid)
            rels = qrels[qid]
            scores["ndcg@10"].append(ndcg_at(ranked, rels, 10))
            scores["recall@10"].append(recall_at(ranked, rels, 10))
            scores["recall@100"].append(recall_at(ranked, rels, 100))
            scores["mrr@10"].append(mrr_at(ranked, rels, 10))
        result[mode] = {
            **{k: round(statistics.fmean(v), 4) if v else 0.0 for k, v in scores.items()},
            "latency_p50_ms": round(percentile(latencies, 0.5), 2),
            "latency_p95_ms": round(percentile(latencies, 0.95), 2),
        }
    result["embedder"] = parts.embedder.name
    result["rrf_k"] = retriever.rrf_k
    result["ingest_s"] = round(ingest_s, 1)
    result["chunks"] = len(parts.index)
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    sys.stdout.write(text + "\n")


if __name__ == "__main__":
    main()
