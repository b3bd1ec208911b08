"""Linear-layer kernels on the shapes of a decoder, in one run. JSON out.

Usage: python bench/quant_kernels.py [--model 1.5b|0.5b] [--rows 1,4,16,600] [--repeat 20]

For each weight shape of the Qwen2.5 1.5B (or 0.5B) layers and the vocabulary projection,
times y = x @ W.T for x with `rows` rows: float (the model dtype, the baseline), torch's
weight-only int4 and int8 kernels, and ragqa's int4/int8 x int8 kernels (generation/qmatmul.py).
Reports median milliseconds per call and ratios of ragqa's kernels to the float baseline
and to torch's kernel of the same width.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

from generation import qmatmul
from generation.device import choose_dtype
from generation.quant import quantize_int4, quantize_int8, quantize_int8_blocks

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


def median_ms(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1000, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", choices=sorted(SHAPES), default="1.5b")
    parser.add_argument("--rows", default="1,4,16")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--group-size", type=int, default=64)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    dtype = choose_dtype(torch.device("cpu"))
    if not qmatmul.load():
        raise SystemExit("the int4/int8 kernels could not be built here (see the log)")
    g = args.group_size
    results: dict[str, dict[str, object]] = {}
    for name, (n, k) in SHAPES[args.model].items():
        w = (torch.randn(n, k) * 0.02).to(dtype)
        q4, sz = quantize_int4(w, g)
        packed4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4.to(torch.int32), 2)
        sz_dtype = sz.to(dtype)
        q8, s8 = quantize_int8(w)  # torch's kernel: a scale per row
        s8 = s8.to(dtype)
        q8b, s8b = quantize_int8_blocks(w)  # ours: a scale per block of 32
        qs, sm = qmatmul.pack_int4(q4, sz)
        del q4
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, k).to(dtype)
            with torch.inference_mode():
                timing = {
                    "float_ms": median_ms(lambda: F.linear(x, w), args.repeat),  # noqa: B023
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
            timing["ratio_ragqa_int4_vs_float"] = round(
                timing["ragqa_int4_ms"] / timing["float_ms"], 3
            )
            timing["ratio_ragqa_int4_vs_torch_int4"] = round(
                timing["ragqa_int4_ms"] / timing["torch_int4_ms"], 3
            )
            timing["ratio_ragqa_int8_vs_float"] = round(
                timing["ragqa_int8_ms"] / timing["float_ms"], 3
            )
            timing["ratio_ragqa_int8_vs_torch_int8"] = round(
                timing["ragqa_int8_ms"] / timing["torch_int8_ms"], 3
            )
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
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
