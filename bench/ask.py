"""Ask-path benchmark: retrieval latency at 10k/100k chunks and end-to-end /v1/ask TTFT. JSON out.

Usage: python bench/ask.py [--sizes 10000,100000] [--presets qwen2.5-coder-0.5b-instruct,...]
                           [--questions 10] [--index-type flat]

Retrieval runs on synthetic chunks (random sentences from a fixed vocabulary, embedded
with random unit vectors so that building 100k takes seconds) through the real hybrid
retriever with a real query embedder; the baseline in the same run is FAISS search alone.
The ask part starts a real HTTP server per preset, ingests a few real paragraphs and
streams answers, timing the first `delta` event (TTFT) and the `done` event (total).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from stats import percentile  # bench/stats.py, beside this script

from app.main import build_services
from app.settings import Settings
from app.wiring import build_embedder, build_ingest, build_retriever
from ingest.schema import Chunk, Document

_VOCAB = """river delta flood silt farm copper wire current glacier valley moraine comet tail
telescope bee hive dance flower treaty tariff grain port price engine nitrogen oslo volcano
magma lava crust library archive manuscript printing press paper ink bridge steel cable tower
harbour ship cargo railway station signal timetable budget audit"""
WORDS = _VOCAB.split()
QUESTIONS = [
    "How does the river delta keep farmland fertile?",
    "Why is copper used for electrical wire?",
    "What shape of valley do glaciers carve?",
    "How do bees tell each other where flowers are?",
    "What did the treaty say about grain tariffs?",
    "How does magma reach the surface?",
    "Who invented the printing press?",
    "What holds up a suspension bridge?",
    "When does the last train leave the station?",
    "How was the budget audited?",
]
PARAGRAPHS = [
    "The river delta floods each spring. The flood deposits silt, which keeps the farmland "
    "fertile; farmers plant rice as soon as the water recedes.",
    "Copper wire carries electric current with little loss and resists corrosion, which is "
    "why it has been used for household wiring for more than a century.",
    "Glaciers carve U-shaped valleys as they move. When they melt they leave moraines, long "
    "ridges of rock and gravel, at their former edges.",
    "Honey bees tell each other where flowers are with a waggle dance: the angle of the "
    "dance gives the direction and its length gives the distance.",
    "The 1878 treaty set a tariff of two percent on grain and required both ports to publish "
    "their prices every week.",
]


def synthetic_corpus(settings: Settings, size: int, dim: int, rng: random.Random) -> None:
    services = build_services(settings)
    with services.sessions() as session, session.begin():
        docs = [
            Document(
                collection="default",
                filename=f"synthetic-{i}.txt",
                sha256=f"{i:064x}",
                mime="text/plain",
                size=1,
                status="ready",
                meta={},
                timings={},
            )
            for i in range(max(1, size // 20))
        ]
        session.add_all(docs)
        session.flush()
        vectors = np.random.default_rng(0).standard_normal((size, dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        rows = []
        for i in range(size):
            text = " ".join(rng.choice(WORDS) for _ in range(60)) + "."
            rows.append(
                {
                    "document_id": docs[i // 20].id,
                    "ordinal": i % 20,
                    "text": text,
                    "page": None,
                    "heading_path": None,
                    "char_start": 0,
                    "char_end": len(text),
                    "token_count": 60,
                    "embedding": vectors[i].tobytes(),
                }
            )
        session.execute(Chunk.__table__.insert(), rows)
    services.engine.dispose()


def bench_retrieval(size: int, index_type: str, n_queries: int) -> dict[str, float]:
    root = Path(tempfile.mkdtemp(prefix=f"ragqa-bench-ask-{size}-"))
    settings = Settings(data_dir=root, index_type=index_type)
    embedder = build_embedder(settings)
    synthetic_corpus(settings, size, embedder.dim, random.Random(size))
    services = build_services(settings)
    parts = build_ingest(settings, services.sessions, embedder=embedder)
    parts.pipeline.rebuild_index()
    retriever = build_retriever(settings, services.sessions, parts)
    start = time.perf_counter()
    retriever.lexical.ensure(parts.index.version, wait=True)
    lexical_build = time.perf_counter() - start
    queries = [QUESTIONS[i % len(QUESTIONS)] for i in range(n_queries)]
    retriever.search(queries[0])  # warm-up
    hybrid, faiss_only = [], []
    for q in queries:
        start = time.perf_counter()
        retriever.search(q, top_k=5)
        hybrid.append((time.perf_counter() - start) * 1000)
        vec = embedder.embed([q])
        start = time.perf_counter()
        parts.index.search(vec, 50)
        faiss_only.append((time.perf_counter() - start) * 1000)
    return {
        "retrieval_p50_ms": round(percentile(hybrid, 0.5), 2),
        "retrieval_p95_ms": round(percentile(hybrid, 0.95), 2),
        "faiss_only_p50_ms": round(percentile(faiss_only, 0.5), 2),
        "ratio_hybrid_vs_faiss_only": round(
            statistics.median(hybrid) / max(statistics.median(faiss_only), 1e-6), 1
        ),
        "lexical_build_s": round(lexical_build, 1),
        "index_type": index_type,
    }


def bench_ask(preset: str, n_questions: int) -> dict[str, float]:
    import httpx
    import uvicorn

    from app.main import create_app

    root = Path(tempfile.mkdtemp(prefix="ragqa-bench-ask-e2e-"))
    settings = Settings(data_dir=root, generator=preset, max_answer_tokens=128)
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=8765, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = "http://127.0.0.1:8765"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz").json()["generator"]["state"] in ("ready", "error"):
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    for i, text in enumerate(PARAGRAPHS):
        doc = httpx.post(f"{url}/v1/documents", files={"file": (f"p{i}.txt", text.encode())})
        doc_id = doc.json()["id"]
        while httpx.get(f"{url}/v1/documents/{doc_id}").json()["status"] not in ("ready", "failed"):
            time.sleep(0.1)
    ttfts, totals, refused = [], [], 0
    for i in range(n_questions):
        q = QUESTIONS[i % 5]
        start = time.perf_counter()
        first = None
        with httpx.stream(
            "POST", f"{url}/v1/ask", json={"question": q, "stream": True}, timeout=600
        ) as r:
            for line in r.iter_lines():
                if line.startswith("event: delta") and first is None:
                    first = time.perf_counter() - start
                if line.startswith("data: ") and '"refused": true' in line:
                    refused += 1
        totals.append(time.perf_counter() - start)
        ttfts.append(first if first is not None else totals[-1])
    server.should_exit = True
    thread.join(timeout=60)
    return {
        "ttft_p50_s": round(statistics.median(ttfts), 3),
        "ttft_p95_s": round(percentile(ttfts, 0.95), 3),
        "total_p50_s": round(statistics.median(totals), 3),
        "questions": n_questions,
        "refused": refused,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument(
        "--presets", default="qwen2.5-coder-0.5b-instruct,qwen2.5-coder-1.5b-instruct"
    )
    parser.add_argument("--questions", type=int, default=10)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--index-type", default="flat")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    result: dict[str, object] = {"retrieval": {}, "ask": {}}
    for size in [int(s) for s in args.sizes.split(",") if s]:
        result["retrieval"][str(size)] = bench_retrieval(size, args.index_type, args.queries)  # type: ignore[index]
    for preset in [p for p in args.presets.split(",") if p]:
        result["ask"][preset] = bench_ask(preset, args.questions)  # type: ignore[index]
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
