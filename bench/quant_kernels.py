"""Linear-layer kernels on the shapes of a decoder, in one run. JSON out.

Usage: python bench/quant_kernels.py [--model 1.5b|0.5b] [--rows 1,4,16,600] [--repeat 20]
       [--dtype auto|float32|bfloat16]

For each weight shape of the Qwen2.5 1.5B (or 0.5B) layers and the vocabulary projection,
times y = x @ W.T for x with `rows` rows: float (the model dtype, the baseline), the float
weight stored column-major as prefill keeps it (generation/quant.py `prefill_layout`),
torch's weight-only int4 and int8 kernels, and ragqa's int4/int8 x int8 kernels
(generation/qmatmul.py). Reports median milliseconds per call and ratios of ragqa's kernels
to the float baseline and to torch's kernel of the same width, and of the column-major
float weight to the row-major one. Above 16 rows (where the engine prefills) the float
layouts are timed against ragqa's integer prefill GEMMs (`RAGQA_PREFILL_WEIGHTS=integer`):
`int4_gemm` on the int4 packs, `int8_gemm` on int8 packs of 5-bit values (-16..15, as
a GGUF's Q5_0 blocks hold) and, where the inputs come in blocks of 256, `int6_gemm` on
6-bit packs (a GGUF's Q6_K form), except on the vocabulary projection, which prefill
multiplies for one row only; where those GEMMs run on AVX-512 VNNI, their AVX2 form is timed
too (`ratio_ragqa_<gemm>_vs_avx2`). `--dtype float32` times the float baselines in float32
on a CPU where `auto` picks bfloat16.

The per-shape timings reuse one weight, which then sits in the CPU cache. A decode step
instead streams every layer's weights from memory once, so `decode_step` (int8),
`decode_step_int4` (int4, --group-size) and `decode_step_int6` (a GGUF's Q6_K blocks, on
the models whose every layer takes them: the 1.5B) time ragqa's kernel over distinct
weights for every layer (1.6 GB for the 1.5B model in int8) against a plain read of the
same number of bytes: the memory-bandwidth floor of a decode step. On a CPU with AVX-512
VNNI, where the int4/int8/int6 kernels run on it, the AVX2 ones are timed over the same
weights in the same rounds (`ratio_<kind>_avx512-vnni_vs_avx2`).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

from generation import qmatmul
from generation.device import choose_dtype
from generation.quant import prefill_layout, quantize_int4, quantize_int8, quantize_int8_blocks

SHAPES = {  # name -> (out_features N, in_features K)
    "1.5b": {
        "qkv": (2048, 1536),
        "o_proj": (1536, 1536),
        "gate_up": (8960, 1536),
        "down": (1536, 8960),
        "lm_head": (151936, 1536),
    },
    "0.5b": {
        "qkv": (1152, 896),
        "o_proj": (896, 896),
        "gate_up": (4864, 896),
        "down": (896, 4864),
        "lm_head": (151936, 896),
    },
}


LAYERS = {"1.5b": 28, "0.5b": 24}
# Above this many rows the engine multiplies by float weights (QuantizedLinear's
# prefill_rows), and torch's int4 kernel would take minutes on the vocabulary projection.
PREFILL_ROWS = 16


def median_ms(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1000, 3)


def decode_step(model: str, repeat: int, kind: str, group: int) -> dict[str, float | str]:
    """One decode step's int8, int4 or int6 matmuls over distinct weights vs reading as many
    bytes."""
    shapes = SHAPES[model]
    # gate and up are one stacked weight at run time (siblings.fuse_siblings), as are q/k/v.
    gate_up = (2 * shapes["gate_up"][0], shapes["gate_up"][1])
    order = [shapes["qkv"], shapes["o_proj"], gate_up, shapes["down"]]
    weights = []
    for n, k in order * LAYERS[model] + [shapes["lm_head"]]:
        if kind == "int8":
            q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
            s = (torch.rand(n, k // qmatmul.BLOCK) * 1e-3).half()
        elif kind == "int6":  # Q6_K blocks: 192 bytes of values, 18 of scales per 256 inputs
            q = torch.randint(0, 256, (n, k // 256 * 192), dtype=torch.uint8)
            s = torch.randint(0, 128, (n, k // 256 * 18), dtype=torch.uint8)
            s.view(n, k // 256, 18)[..., 16:] = torch.tensor([0x00, 0x10], dtype=torch.uint8)
        else:
            q = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
            s = (torch.rand(n, k // group, 2) * 1e-3).half()
        weights.append((torch.randn(1, k), q, s))
    nbytes = sum(q.nbytes + s.nbytes for _, q, s in weights)
    # Random floats, not zeros: a fresh zeroed allocation may be the shared zero page.
    plain = [torch.randn((q.nbytes + s.nbytes) // 4) for _, q, s in weights]

    def matmuls() -> None:
        for x, q, s in weights:
            if kind == "int8":
                qmatmul.int8_linear(x, q, s)
            elif kind == "int6":
                qmatmul.int6_linear(x, q, s)
            else:
                qmatmul.int4_linear(x, q, s, group)

    def read() -> None:
        for t in plain:
            t.sum()

    def on(isa: str) -> Callable[[], None]:
        def run() -> None:
            qmatmul.set_kernel_isa(isa)
            matmuls()

        return run

    default_isa = qmatmul.kernel_isa()
    isas = qmatmul.available_kernel_isas()
    times: dict[str, list[float]] = {name: [] for name in [*isas, "read"]}
    with torch.inference_mode():
        for isa in isas:  # warm-up, once: every pass streams the same bytes anyway
            on(isa)()
        read()
        # Interleaved, so a change in the machine's memory bandwidth hits all alike.
        for _ in range(repeat):
            for name in times:
                fn = read if name == "read" else on(name)
                start = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - start) * 1000)
    qmatmul.set_kernel_isa(default_isa)
    ms = {name: round(statistics.median(values), 3) for name, values in times.items()}
    kernel_ms = ms[default_isa]
    out = {
        "weight_gb": round(nbytes / 1e9, 3),
        "kernel_isa": default_isa,
        f"ragqa_{kind}_ms": kernel_ms,
        "read_same_bytes_ms": ms["read"],
        f"ratio_{kind}_vs_read": round(kernel_ms / ms["read"], 3),
        f"{kind}_gb_s": round(nbytes / kernel_ms / 1e6, 1),
    }
    if default_isa in isas and "avx2" in isas and default_isa != "avx2":
        # the AVX2 kernels on the same weights, in the same rounds
        out[f"ragqa_{kind}_avx2_ms"] = ms["avx2"]
        out[f"ratio_{kind}_{default_isa}_vs_avx2"] = round(kernel_ms / ms["avx2"], 3)
    return out


def gemm_timings(gemms: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Median ms of each prefill GEMM on the default kernels, and where those are AVX-512
    VNNI, on the AVX2 ones too, with the ratio of the two."""
    default_isa = qmatmul.kernel_isa()
    out = {f"{name}_ms": median_ms(gemm, repeat) for name, gemm in gemms.items()}
    if default_isa != "avx2":
        qmatmul.set_kernel_isa("avx2")
        try:
            for name, gemm in gemms.items():
                out[f"{name}_avx2_ms"] = median_ms(gemm, repeat)
                out[f"ratio_{name}_vs_avx2"] = round(out[f"{name}_ms"] / out[f"{name}_avx2_ms"], 3)
        finally:
            qmatmul.set_kernel_isa(default_isa)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", choices=sorted(SHAPES), default="1.5b")
    parser.add_argument("--rows", default="1,4,16", help="row counts; empty: none")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--dtype", default="auto", help="the float baselines' dtype")
    parser.add_argument(
        "--step-repeat", type=int, default=7, help="decode steps timed (0 skips decode_step)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    dtype = choose_dtype(torch.device("cpu"), args.dtype)
    if not qmatmul.load():
        raise SystemExit("the int4/int8 kernels could not be built here (see the log)")
    g = args.group_size
    results: dict[str, dict[str, object]] = {}
    for name, (n, k) in SHAPES[args.model].items():
        w = (torch.randn(n, k) * 0.02).to(dtype)
        w_columns = prefill_layout(w, dtype)
        q4, sz = quantize_int4(w, g)
        packed4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4.to(torch.int32), 2)
        sz_dtype = sz.to(dtype)
        q8, s8 = quantize_int8(w)  # torch's kernel: a scale per row
        s8 = s8.to(dtype)
        q8b, s8b = quantize_int8_blocks(w)  # ours: a scale per block of 32
        qs, sm = qmatmul.pack_int4(q4, sz)
        del q4
        q5 = torch.clamp(torch.round(q8b.float() / 8), -16, 15).to(torch.int8)  # 5-bit values
        # 6-bit values with an int8 scale per 16 and a float16 d per 256 (timing only:
        # the values need not stand for w).
        q6 = torch.clamp(torch.round(q8b.float() / 4), -32, 31).to(torch.int8)
        c6 = torch.randint(1, 128, (n, k // 16), dtype=torch.int8)
        d6 = torch.full((n, k // 256), 1e-4, dtype=torch.float16)
        if qmatmul.supports_int6(k):  # the same, as decode packs (random bytes: timing only)
            q6k = torch.randint(0, 256, (n, k // 256 * 192), dtype=torch.uint8)
            s6k = torch.randint(0, 128, (n, k // 256 * 18), dtype=torch.uint8)
        for rows in (int(r) for r in args.rows.split(",") if r):
            x = torch.randn(rows, k).to(dtype)
            timing: dict[str, float] = {}
            with torch.inference_mode():
                timing["float_ms"] = median_ms(lambda: F.linear(x, w), args.repeat)  # noqa: B023
                timing["float_column_major_ms"] = median_ms(
                    lambda: F.linear(x, w_columns),  # noqa: B023
                    args.repeat,
                )
                if rows > PREFILL_ROWS and name != "lm_head":
                    gemms = {
                        "ragqa_int4_gemm": lambda: qmatmul.int4_gemm(x, qs, sm, g),  # noqa: B023
                        "ragqa_int8_gemm_5_bit": lambda: qmatmul.int8_gemm(x, q5, s8b),  # noqa: B023
                    }
                    if qmatmul.supports_int6(k):
                        gemms["ragqa_int6_gemm"] = lambda: qmatmul.int6_gemm(x, q6, c6, d6)  # noqa: B023
                    timing |= gemm_timings(gemms, args.repeat)
                if rows <= PREFILL_ROWS:
                    timing |= {
                        "torch_int8_ms": median_ms(
                            lambda: torch.ops.aten._weight_int8pack_mm(x, q8, s8),  # noqa: B023
                            args.repeat,
                        ),
                        "torch_int4_ms": median_ms(
                            lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
                                x,  # noqa: B023
                                packed4,  # noqa: B023
                                g,
                                sz_dtype,  # noqa: B023
                            ),
                            args.repeat,
                        ),
                        "ragqa_int4_ms": median_ms(
                            lambda: qmatmul.int4_linear(x, qs, sm, g),  # noqa: B023
                            args.repeat,
                        ),
                        "ragqa_int8_ms": median_ms(
                            lambda: qmatmul.int8_linear(x, q8b, s8b),  # noqa: B023
                            args.repeat,
                        ),
                    }
                    if qmatmul.supports_int6(k):
                        timing["ragqa_int6_ms"] = median_ms(
                            lambda: qmatmul.int6_linear(x, q6k, s6k),  # noqa: B023
                            args.repeat,
                        )
            ratios = {
                "float_column_major_vs_row_major": ("float_column_major_ms", "float_ms"),
                "ragqa_int4_vs_float": ("ragqa_int4_ms", "float_ms"),
                "ragqa_int4_vs_torch_int4": ("ragqa_int4_ms", "torch_int4_ms"),
                "ragqa_int8_vs_float": ("ragqa_int8_ms", "float_ms"),
                "ragqa_int8_vs_torch_int8": ("ragqa_int8_ms", "torch_int8_ms"),
                "ragqa_int6_vs_ragqa_int8": ("ragqa_int6_ms", "ragqa_int8_ms"),
                "ragqa_int4_gemm_vs_float": ("ragqa_int4_gemm_ms", "float_column_major_ms"),
                "ragqa_int8_gemm_5_bit_vs_float": (
                    "ragqa_int8_gemm_5_bit_ms",
                    "float_column_major_ms",
                ),
                "ragqa_int6_gemm_vs_float": ("ragqa_int6_gemm_ms", "float_column_major_ms"),
            }
            for label, (a, b) in ratios.items():
                if a in timing and b in timing:
                    timing[f"ratio_{label}"] = round(timing[a] / timing[b], 3)
            results[f"{name} {n}x{k} rows={rows}"] = timing
    out = {
        "model": args.model,
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "group_size": g,
        "repeat": args.repeat,
        "shapes": results,
    }
    if args.step_repeat:
        out["decode_step"] = decode_step(args.model, args.step_repeat, "int8", g)
        out["decode_step_int4"] = decode_step(args.model, args.step_repeat, "int4", g)
        if all(qmatmul.supports_int6(k) for _, k in SHAPES[args.model].values()):
            six = decode_step(args.model, args.step_repeat, "int6", g)
            six["ratio_int6_vs_int8_step"] = round(
                six["ragqa_int6_ms"] / out["decode_step"]["ragqa_int8_ms"], 3
            )
            out["decode_step_int6"] = six
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
