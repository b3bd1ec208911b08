"""Generation benchmark: our engine against `model.generate()` and itself, in one run. JSON out.

Usage: python bench/generation.py --model PRESET_OR_PATH [--prompt-tokens 600] [--new-tokens 128]

Measures, on a RAG-style prompt: TTFT and decode tok/s of the engine vs `generate()` (same
model, dtype, greedy), vs no KV cache, aggregate decode tok/s at 1/2/4/8 concurrent
requests, TTFT with a warm shared prefix vs cold, and peak RSS. Timings are medians.
With --compare-llama-cpp, llama.cpp decodes the preset's GGUF from the same prompt tokens,
one run after each of the engine's, on the same thread. With --compare-hf-forward, each
round also decodes through transformers' forward instead of `generation/lean_decode.py`.
With --kernel-isa avx2 on a CPU with AVX-512 VNNI, quantized layers run on the AVX2
kernels; with --compare-avx2, each round also runs on them (the two in the same rounds):
decode steps, and the integer prefill GEMM where the prefill takes it. With
--compare-one-part, each round also decodes with the decode kernels' activations in one
int8 part instead of two (`qmatmul.set_two_part_activations`); --activation-parts 1 runs
the whole benchmark so.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from generation import qmatmul
from generation.attention import use_decode_attention
from generation.engine import Engine
from generation.params import GenerationParams
from generation.presets import GENERATOR_PRESETS
from generation.provision import resolve_generator
from generation.quant import SETTING_MODES
from generation.scheduler import Scheduler

SYSTEM = (
    "You answer questions using only the numbered passages below. Cite the passages you "
    "use as [n]. If the passages do not contain the answer, say that you cannot answer."
)
TOPICS = [
    "The river delta floods each spring, depositing silt that keeps the farmland fertile.",
    "Copper wiring conducts electricity with little loss and resists corrosion for decades.",
    "The observatory recorded a comet whose tail stretched across a tenth of the sky.",
    "Bees communicate the direction of flowers through a waggle dance inside the hive.",
    "The treaty set tariffs on grain and required both ports to publish their prices.",
    "Glaciers carve U-shaped valleys and leave moraines of rock where they melt.",
]


def rag_messages(engine: Engine, prompt_tokens: int, question: str) -> list[dict[str, str]]:
    """System + numbered passages grown until the chat prompt has about `prompt_tokens`."""
    passages: list[str] = []
    i = 0
    while True:
        body = "\n\n".join(f"[{n + 1}] {p}" for n, p in enumerate(passages))
        messages = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Passages:\n{body}\n\nQuestion: {question}"},
        ]
        if len(engine.chat_ids(messages)) >= prompt_tokens:
            return messages
        passages.append(" ".join(TOPICS[(i + j) % len(TOPICS)] for j in range(3)))
        i += 1


def timed(fn, *args):  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def hf_generate(engine: Engine, ids: list[int], n: int) -> tuple[float, float, list[int]]:
    """(ttft_s, total_s, tokens) of transformers' generate(), greedy, exactly n tokens.

    The baseline is stock transformers: its own loop with its own SDPA attention (the
    engine switches CPU models to `generation.attention` for decode steps).
    """
    inputs = torch.tensor([ids], device=engine.device)
    mask = torch.ones_like(inputs)
    kw = {"do_sample": False, "attention_mask": mask, "pad_token_id": engine.tokenizer.eos_token_id}
    engine.model.set_attn_implementation("sdpa")
    try:
        start = time.perf_counter()
        engine.model.generate(inputs, max_new_tokens=1, min_new_tokens=1, **kw)
        ttft = time.perf_counter() - start
        start = time.perf_counter()
        out = engine.model.generate(inputs, max_new_tokens=n, min_new_tokens=n, **kw)
        total = time.perf_counter() - start
    finally:
        use_decode_attention(engine.model)
    return ttft, total, out[0][len(ids) :].tolist()


async def concurrent(scheduler: Scheduler, prompts: list[list[int]], n: int) -> dict[str, float]:
    params = GenerationParams(max_new_tokens=n, ignore_eos=True)
    first: list[float] = []
    start = time.perf_counter()

    async def one(ids: list[int]) -> int:
        tokens = 0
        async for ev in scheduler.stream(ids, params):
            if ev.done:
                tokens = ev.completion_tokens
                first.append(start + (ev.ttft_s or 0.0))
        return tokens

    counts = await asyncio.gather(*(one(ids) for ids in prompts))
    end = time.perf_counter()
    all_started = max(first)
    decode_tokens = sum(c - 1 for c in counts)
    return {
        "decode_tok_s": decode_tokens / max(end - all_started, 1e-9),
        "wall_tok_s": sum(counts) / (end - start),
    }


def load_llama_cpp(args: argparse.Namespace) -> tuple[Any, str]:
    """(llama_cpp.Llama on the preset's GGUF, "") or (None, why it cannot run)."""
    try:
        from llama_cpp import Llama  # a benchmark baseline only, never a runtime dependency
    except ImportError:
        return None, (
            "not installed: 'pip install llama-cpp-python' builds it from source "
            "(25-50 minutes on 2 cores)"
        )
    gguf = args.model_dir.expanduser() / args.model / "model.gguf"
    if not gguf.exists():
        return None, f"no GGUF at {gguf}"
    llm = Llama(model_path=str(gguf), n_ctx=2048, n_threads=torch.get_num_threads(), verbose=False)
    return llm, ""


def llama_cpp_once(llm: Any, ids: list[int], n: int) -> tuple[float, float]:
    """(ttft_s, decode tok/s) of llama.cpp on the same prompt tokens, greedy, n tokens."""
    llm.reset()
    start = time.perf_counter()
    first = None
    count = 0
    for _tok in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        count += 1
        if first is None:
            first = time.perf_counter() - start
        if count >= n:
            break
    total = time.perf_counter() - start
    return first or total, (count - 1) / max(total - (first or 0), 1e-9)


def hf_forward_once(
    engine: Engine, ids: list[int], params: GenerationParams
) -> tuple[float, list[int]]:
    """(decode tok/s, tokens) of the engine with decode steps through transformers' forward."""
    lean, engine.lean = engine.lean, None
    try:
        r = engine.generate(ids, params)
    finally:
        engine.lean = lean
    return (len(r.token_ids) - 1) / (r.total_s - r.ttft_s), r.token_ids


def generate_switched(
    engine: Engine, ids: list[int], params: GenerationParams, switch: Any, value: Any
) -> tuple[float, list[int], float]:
    """(decode tok/s, tokens, ttft_s) of one generation with a kernel choice switched to
    `value` for its duration: `switch` is a `qmatmul` setter that returns the previous
    choice (`set_kernel_isa`, `set_two_part_activations`)."""
    previous = switch(value)
    try:
        r = engine.generate(ids, params)
    finally:
        switch(previous)
    return (len(r.token_ids) - 1) / (r.total_s - r.ttft_s), r.token_ids, r.ttft_s


def variant_comparison(
    name: str,
    ours: list[tuple[float, float, list[int]]],
    runs: list[tuple[float, list[int], float]],
) -> dict[str, Any]:
    """The engine's rounds against the same rounds of a variant (`generate_switched`)."""
    return {
        f"{name}_decode_tok_s": round(statistics.median(x[0] for x in runs), 2),
        f"{name}_decode_tok_s_per_round": [round(x[0], 2) for x in runs],
        f"ratio_decode_vs_{name}_paired": round(
            statistics.median(o[1] / x[0] for o, x in zip(ours, runs, strict=True)), 3
        ),
        # the two round differently, so greedy tokens may part after a while
        f"{name}_tokens_identical": all(x[1] == ours[0][2] for x in runs),
        f"{name}_ttft_s": round(statistics.median(x[2] for x in runs), 3),
        f"ratio_ttft_vs_{name}_paired": round(
            statistics.median(o[0] / x[2] for o, x in zip(ours, runs, strict=True)), 3
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--model-dir", type=Path, default=Path("~/.cache/ragqa/models"))
    parser.add_argument("--prompt-tokens", type=int, default=600)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--no-cache-tokens", type=int, default=16)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--concurrency", default="1,2,4,8")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--quant", choices=SETTING_MODES, default="none")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument(
        "--prefill-weights",
        choices=["auto", "float", "quantized", "integer"],
        default="auto",
        help="What a quantized model prefills with (RAGQA_PREFILL_WEIGHTS).",
    )
    parser.add_argument(
        "--compare-llama-cpp", action="store_true", help="Also run the GGUF through llama.cpp."
    )
    parser.add_argument(
        "--compare-hf-forward",
        action="store_true",
        help="Also decode each round through transformers' forward instead of lean_decode.",
    )
    parser.add_argument(
        "--kernel-isa",
        choices=("auto", *qmatmul.KERNEL_ISAS),
        default="auto",
        help="The instruction set of the int4/int8 kernels (auto: the best the CPU has).",
    )
    parser.add_argument(
        "--compare-avx2",
        action="store_true",
        help="Also run each round on the AVX2 kernels (a CPU with AVX-512 VNNI).",
    )
    parser.add_argument(
        "--activation-parts",
        type=int,
        choices=(1, 2),
        default=2,
        help="The decode kernels' activations in one int8 part or two (the default).",
    )
    parser.add_argument(
        "--compare-one-part",
        action="store_true",
        help="Also decode each round with one-part activations (against two).",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)

    path = resolve_generator(args.model, args.model_dir.expanduser(), allow_hub=False)
    reports = []

    def loader() -> Engine:
        engine, report = Engine.load(
            path,
            dtype=args.dtype,
            name=args.model,
            quantization=args.quant,
            group_size=args.group_size,
            prefill_weights=args.prefill_weights,
        )
        reports.append(report)
        return engine

    # Every measurement runs on the scheduler's model thread (as in the server), so the
    # engine, generate() and the batched runs share one OpenMP thread pool.
    scheduler = Scheduler(max_batch=16)
    scheduler.start(loader)
    scheduler.ready.wait()
    if scheduler.load_error is not None:
        raise SystemExit(f"could not load {args.model}: {scheduler.load_error}")
    engine, report = scheduler.engine, reports[0]
    on_model = scheduler.call
    kernel_flags = (
        args.kernel_isa != "auto"
        or args.compare_avx2
        or args.compare_one_part
        or args.activation_parts != 2
    )
    if kernel_flags and not qmatmul.loaded():
        raise SystemExit(
            "--kernel-isa, --compare-avx2, --activation-parts and --compare-one-part need "
            "ragqa's kernels (not loaded)"
        )
    compare_one_part = args.compare_one_part and args.activation_parts == 2
    if args.compare_one_part and not compare_one_part:
        logging.warning("skipping --compare-one-part: --activation-parts 1 runs one part already")
    if qmatmul.loaded():
        qmatmul.set_two_part_activations(args.activation_parts == 2)
    compare_avx2 = args.compare_avx2 and qmatmul.kernel_isa() != "avx2"
    if args.compare_avx2 and not compare_avx2:
        logging.warning("skipping --compare-avx2: the kernels already run on AVX2")
    if args.kernel_isa != "auto":
        try:
            qmatmul.set_kernel_isa(args.kernel_isa)
        except ValueError as exc:
            raise SystemExit(f"--kernel-isa {args.kernel_isa}: {exc}") from exc
    n = args.new_tokens
    messages = rag_messages(
        engine, args.prompt_tokens, "Which passage explains how bees share directions?"
    )
    ids = engine.chat_ids(messages)
    greedy = GenerationParams(max_new_tokens=n, ignore_eos=True)

    # llama.cpp runs on the model thread too: its OpenMP build shares the process's libgomp,
    # and a second thread starting parallel regions would make both thread pools stop
    # spinning between regions (libgomp throttles when it manages more threads than CPUs).
    llm, llama_missing = (
        on_model(lambda: load_llama_cpp(args)) if args.compare_llama_cpp else (None, "")
    )
    on_model(lambda: engine.generate(ids[:64], GenerationParams(max_new_tokens=4)))  # warm-up
    if llm is not None:
        on_model(lambda: llama_cpp_once(llm, ids[:64], 4))
    ours, theirs, llama_runs = [], [], []
    hf_forward: list[tuple[float, list[int]]] = []
    avx2: list[tuple[float, list[int], float]] = []
    one_part: list[tuple[float, list[int], float]] = []
    # Interleaved, one run of each per round: the memory bandwidth of a shared machine
    # drifts by up to a third within an hour, and decode steps are bound by it.
    for _ in range(args.runs):
        r = on_model(lambda: engine.generate(ids, greedy))
        ours.append((r.ttft_s, (len(r.token_ids) - 1) / (r.total_s - r.ttft_s), r.token_ids))
        ttft, total, tokens = on_model(lambda: hf_generate(engine, ids, n))
        theirs.append((ttft, (n - 1) / max(total - ttft, 1e-9), tokens))
        if llm is not None:
            llama_runs.append(on_model(lambda: llama_cpp_once(llm, ids, n)))
        if args.compare_hf_forward and engine.lean is not None:
            hf_forward.append(on_model(lambda: hf_forward_once(engine, ids, greedy)))
        if compare_avx2:  # the decode kernels and the integer prefill GEMM alike
            avx2.append(
                on_model(
                    lambda: generate_switched(engine, ids, greedy, qmatmul.set_kernel_isa, "avx2")
                )
            )
        if compare_one_part:  # the prefill GEMMs take one part either way
            one_part.append(
                on_model(
                    lambda: generate_switched(
                        engine, ids, greedy, qmatmul.set_two_part_activations, False
                    )
                )
            )
    engine_ttft = statistics.median(x[0] for x in ours)
    engine_tps = statistics.median(x[1] for x in ours)
    gen_ttft = statistics.median(x[0] for x in theirs)
    gen_tps = statistics.median(x[1] for x in theirs)

    nc = GenerationParams(max_new_tokens=args.no_cache_tokens, ignore_eos=True)
    r = on_model(lambda: engine.generate(ids, nc, use_cache=False))
    no_cache_tps = (len(r.token_ids) - 1) / (r.total_s - r.ttft_s)

    aggregate: dict[str, float] = {}
    aggregate_wall: dict[str, float] = {}
    questions = [
        "Which passage explains how bees share directions?",
        "What does the treaty require of the ports?",
        "How do glaciers shape valleys?",
        "Why is copper used for wiring?",
    ]
    for level in [int(x) for x in args.concurrency.split(",")]:
        prompts = [
            engine.chat_ids(rag_messages(engine, args.prompt_tokens, questions[i % 4] + f" ({i})"))
            for i in range(level)
        ]
        result = asyncio.run(concurrent(scheduler, prompts, n))
        aggregate[str(level)] = round(result["decode_tok_s"], 2)
        aggregate_wall[str(level)] = round(result["wall_tok_s"], 2)

    # Warm vs cold prefix: the system prompt and passages are shared, the question differs.
    q1 = engine.chat_ids(rag_messages(engine, args.prompt_tokens, "First question here?"))
    q2 = engine.chat_ids(rag_messages(engine, args.prompt_tokens, "Another question?"))
    shared = next(i for i, (a, b) in enumerate(zip(q1, q2, strict=False)) if a != b)
    colds, warms = [], []
    for _ in range(args.runs):
        engine.prefix_cache = type(engine.prefix_cache)(max_entries=8)
        colds.append(on_model(lambda: timed(engine.prefill_with_prefix, q1, shared))[0])
        elapsed, (_, _, reused) = on_model(lambda: timed(engine.prefill_with_prefix, q2, shared))
        warms.append(elapsed)
        assert reused == shared
    scheduler.stop()

    llama: dict[str, Any] = {}
    if llm is not None:
        llama = {
            "llama_cpp_threads": torch.get_num_threads(),
            "llama_cpp_ttft_s": round(statistics.median(x[0] for x in llama_runs), 3),
            "llama_cpp_decode_tok_s": round(statistics.median(x[1] for x in llama_runs), 2),
            # Each round's engine run against the llama.cpp run right after it, then the
            # median: steadier than a ratio of medians when the bandwidth drifts.
            "engine_decode_tok_s_per_round": [round(o[1], 2) for o in ours],
            "llama_cpp_decode_tok_s_per_round": [round(x[1], 2) for x in llama_runs],
            "ratio_decode_vs_llama_cpp_paired": round(
                statistics.median(o[1] / x[1] for o, x in zip(ours, llama_runs, strict=True)), 3
            ),
            "ratio_ttft_vs_llama_cpp_paired": round(
                statistics.median(o[0] / x[0] for o, x in zip(ours, llama_runs, strict=True)), 3
            ),
        }
    elif args.compare_llama_cpp:
        logging.warning("skipping the llama.cpp comparison: %s", llama_missing)
        llama = {"llama_cpp": llama_missing}
    comparisons: dict[str, Any] = {}
    if hf_forward:
        comparisons = {
            "hf_forward_decode_tok_s": round(statistics.median(x[0] for x in hf_forward), 2),
            "ratio_lean_vs_hf_forward_paired": round(
                statistics.median(o[1] / x[0] for o, x in zip(ours, hf_forward, strict=True)), 3
            ),
            "hf_forward_tokens_identical": all(x[1] == ours[0][2] for x in hf_forward),
        }
    if avx2:
        # the integer prefill GEMM runs on AVX2 too (a float prefill does not change)
        comparisons |= variant_comparison("avx2", ours, avx2)
    if one_part:
        comparisons |= variant_comparison("one_part", ours, one_part)
    result = {
        "model": args.model,
        "quantization": report.quantization,
        "prefill_weights": report.prefill_weights,
        "device": report.device,
        "dtype": report.dtype,
        "prefill_dtype": report.prefill_dtype,
        "kernel_isa": qmatmul.kernel_isa() if qmatmul.loaded() else None,
        "activation_parts": args.activation_parts if qmatmul.loaded() else None,
        "threads": torch.get_num_threads(),
        "prompt_tokens": len(ids),
        "new_tokens": n,
        "engine_ttft_s": round(engine_ttft, 3),
        "engine_decode_tok_s": round(engine_tps, 2),
        "generate_ttft_s": round(gen_ttft, 3),
        "generate_decode_tok_s": round(gen_tps, 2),
        "ratio_decode_vs_generate": round(engine_tps / gen_tps, 3),
        "no_cache_decode_tok_s": round(no_cache_tps, 3),
        "ratio_decode_vs_no_cache": round(engine_tps / no_cache_tps, 1),
        "aggregate_tok_s": aggregate,
        "aggregate_wall_tok_s": aggregate_wall,
        "ratio_aggregate_4_vs_1": round(aggregate["4"] / aggregate["1"], 2)
        if "4" in aggregate and "1" in aggregate
        else None,
        "shared_prefix_tokens": shared,
        "ttft_cold_s": round(statistics.median(colds), 3),
        "ttft_warm_prefix_s": round(statistics.median(warms), 3),
        "ratio_warm_vs_cold_ttft": round(statistics.median(warms) / statistics.median(colds), 3),
        "greedy_matches_generate": ours[0][2] == theirs[0][2],
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        **llama,
        **comparisons,
        **(
            {
                "ratio_decode_vs_llama_cpp": round(engine_tps / llama["llama_cpp_decode_tok_s"], 3),
                "ratio_ttft_vs_llama_cpp": round(engine_ttft / llama["llama_cpp_ttft_s"], 3),
                # The bar: 4 concurrent requests together vs llama.cpp serving one.
                "ratio_aggregate_4_vs_llama_cpp": round(
                    aggregate["4"] / llama["llama_cpp_decode_tok_s"], 3
                )
                if "4" in aggregate
                else None,
            }
            if llama.get("llama_cpp_decode_tok_s")
            else {}
        ),
        "runs": args.runs,
        "preset": args.model in GENERATOR_PRESETS,
    }
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
