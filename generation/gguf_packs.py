"""Packs for `RAGQA_QUANTIZATION=gguf`: the weights as the model's own GGUF stores them.

The packaged generators come as GGUF files (Q4_K_M) and the bfloat16 folder the engine
loads is their dequantization (`provision.convert_gguf_to_hf`). A Q4_K tensor holds, for
every 32 weights of a row, 4-bit values q with a scale s and a minimum m (w = q * s + m,
s and m from a 6-bit code times a float16 per 256): exactly the int4 kernel's form with
groups of 32, its nibbles even in the kernel's order. Taken from the file, those weights
are the model's own up to the float16 rounding of s and m (mean absolute error 2.7e-5 on
the 1.5B's first q_proj, where requantizing its bfloat16 weights to int8 errs by 1.1e-4),
at 0.625 bytes a weight instead of int8's 1.0625. Q4_1 blocks (the test generator's) are
that form exactly, float16 scale and minimum per 32 weights. Q8_0 and Q5_0 tensors (the
0.5B's) are int8 blocks of 32 with a float16 scale, the int8 kernel's form: taken as they
are too.
Q6_K tensors (the 1.5B's vocabulary projection and half its down and v projections) are
taken as they are too, for decode steps on their own kernel (`qmatmul.int6_linear`, mode
"q6k": 0.82 bytes a weight where int8 requantized from the float weights took 1.0625 and
rounded them again), and, but for the vocabulary projection, also as `unpack_q6_k` gives
them, for the integer GEMM of a long prefill (`qmatmul.int6_gemm`), which then needs no
float copy of them. Other types become int8 per block of 32 from the float weights, as
`int8` does.

q, k and v (and gate and up) run as one stacked kernel call, which needs one form for all
of them: where the GGUF stores them in different types, all take int8 (a Q6_K v beside
Q4_K q and k too, with its blocks for the GEMM).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from generation import qmatmul
from generation.gguf_file import GgufFile, GgufTensor
from generation.provision import GGUF_NAME
from generation.quant import GEMM_PACKS, Q4K_PACKS, dequantize_int4, dequantize_int8_blocks
from generation.quant import GGUF_GROUP as GROUP

logger = logging.getLogger(__name__)


# transformers' Llama/Qwen2 module names -> GGUF tensor names (llama.cpp's convention).
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)$")
_PARTS = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}
_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
# Types whose blocks are already an int8 or int4 kernel's form.
_EXACT = {"Q4_K": "int4", "Q4_1": "int4", "Q8_0": "int8", "Q5_0": "int8"}
SAMPLE_ROWS = 256  # rows of each tensor checked against the model's weights


def find_gguf(folder: Path) -> Path | None:
    """The GGUF a model folder was converted from: in it, or beside it (the model cache keeps
    `<preset>/model.gguf` next to `<preset>/hf`)."""
    for candidate in (folder / GGUF_NAME, folder.parent / GGUF_NAME):
        if candidate.is_file():
            return candidate
    return None


def gguf_name(module: str) -> str | None:
    """The GGUF tensor of a transformers projection, or None for a name it does not map."""
    if module == "lm_head":
        return "output.weight"
    match = _LAYER.match(module)
    if match is None or match.group(3) not in _PARTS:
        return None
    return f"blk.{match.group(1)}.{_PARTS[match.group(3)]}.weight"


def _q4_k_parts(blocks: np.ndarray) -> tuple[np.ndarray, ...]:
    """Q4_K blocks [B, 144] -> d, dmin [B, 1] float16 and the codes sc, mn [B, 8] uint8 of
    their 8 sub-blocks of 32 (see `unpack_q4_k`)."""
    d = blocks[:, 0:2].copy().view(np.float16)
    dmin = blocks[:, 2:4].copy().view(np.float16)
    codes = blocks[:, 4:16]
    sc = np.empty((len(blocks), 8), np.uint8)
    mn = np.empty((len(blocks), 8), np.uint8)
    # Sub-blocks 0-3 keep 6 bits in bytes 0-3 (scales) and 4-7 (minima); sub-blocks 4-7
    # keep 4 bits in bytes 8-11 and their top 2 bits in the top bits of bytes 0-7.
    sc[:, :4] = codes[:, 0:4] & 63
    mn[:, :4] = codes[:, 4:8] & 63
    sc[:, 4:] = (codes[:, 8:12] & 0xF) | ((codes[:, 0:4] >> 6) << 4)
    mn[:, 4:] = (codes[:, 8:12] >> 4) | ((codes[:, 4:8] >> 6) << 4)
    return d, dmin, sc, mn


def unpack_q4_k(raw: np.ndarray, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K blocks of an [n, k] tensor -> (q [n, k] uint8 0..15, scales_and_zeros
    [k/32, n, 2] float32), the int4 packs' form: w = (q - 8) * scale + zero.

    A block of 256 weights is 144 bytes: float16 d and dmin, 12 bytes of 6-bit scale and
    minimum codes for its 8 sub-blocks of 32, then 128 bytes of nibbles in which each 64
    weights are 32 bytes, the first 32 weights in the low nibbles and the next 32 in the
    high ones. Sub-block j: s = d * sc_j, m = -dmin * mn_j.
    """
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(n * k // 256, 144)
    d, dmin, sc, mn = _q4_k_parts(blocks)
    scale = torch.from_numpy(d.astype(np.float32) * sc).reshape(n, k // GROUP)
    minimum = torch.from_numpy(-dmin.astype(np.float32) * mn).reshape(n, k // GROUP)
    nibbles = torch.from_numpy(np.ascontiguousarray(blocks[:, 16:])).reshape(n, k // 64, 1, 32)
    q = torch.cat([nibbles & 0xF, nibbles >> 4], dim=2).reshape(n, k)
    zero = minimum + 8 * scale
    scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()
    return q, scales_and_zeros


def q4_k_codes(raw: np.ndarray, n: int, k: int) -> dict[str, torch.Tensor]:
    """Q4_K blocks of an [n, k] tensor -> the Q4_K GEMM's scales (`qmatmul.q4k_gemm`, beside
    the int4 packs' nibbles): q4k_codes [n, k/32, 2] uint8, each sub-block's sc and mn,
    and q4k_dd [n, k/256, 2] float16, each block's d and dmin: w = d sc q - dmin mn, as
    the file holds them (the int4 packs round d sc and dmin mn to float16)."""
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(n * k // 256, 144)
    d, dmin, sc, mn = _q4_k_parts(blocks)
    codes = np.stack([sc, mn], axis=-1).reshape(n, k // 32, 2)
    dd = np.concatenate([d, dmin], axis=1).reshape(n, k // 256, 2)
    return {
        Q4K_PACKS[0]: torch.from_numpy(np.ascontiguousarray(codes)),
        Q4K_PACKS[1]: torch.from_numpy(np.ascontiguousarray(dd)),
    }


def unpack_q4_1(raw: np.ndarray, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_1 blocks of an [n, k] tensor -> the int4 packs' form, as `unpack_q4_k`.

    A block of 32 weights is 20 bytes: float16 d and m, then 16 bytes whose low nibbles are
    weights 0-15 and high nibbles 16-31: w = q * d + m, the kernel's float16 form exactly.
    """
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(n * k // GROUP, 20)
    d = torch.from_numpy(blocks[:, 0:2].copy().view(np.float16).astype(np.float32))
    m = torch.from_numpy(blocks[:, 2:4].copy().view(np.float16).astype(np.float32))
    nibbles = torch.from_numpy(np.ascontiguousarray(blocks[:, 4:]))
    q = torch.cat([nibbles & 0xF, nibbles >> 4], dim=1).reshape(n, k)
    scale, minimum = d.reshape(n, k // GROUP), m.reshape(n, k // GROUP)
    zero = minimum + 8 * scale
    return q, torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()


def unpack_q8_0(raw: np.ndarray, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0 blocks (float16 d, then 32 int8 values: w = q * d) -> (int8 [n, k], float16
    scales [n, k/32]), the int8 packs' form."""
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(n * k // 32, 34)
    d = blocks[:, 0:2].copy().view(np.float16).reshape(n, k // 32)
    q = blocks[:, 2:].copy().view(np.int8).reshape(n, k)
    return torch.from_numpy(q), torch.from_numpy(d)


def unpack_q5_0(raw: np.ndarray, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q5_0 blocks -> the int8 packs' form (values -16..15, float16 scales [n, k/32]).

    A block is float16 d, 4 bytes of fifth bits (bit j for weight j), 16 bytes of nibbles
    (weights 0-15 low, 16-31 high): w = (q - 16) * d.
    """
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(n * k // 32, 22)
    d = blocks[:, 0:2].copy().view(np.float16).reshape(n, k // 32)
    # Byte by byte, in uint8: a little-endian uint32's bit j is bit j % 8 of byte j // 8.
    fifth = np.unpackbits(blocks[:, 2:6], axis=1, bitorder="little")  # [B, 32] 0/1
    nibbles = blocks[:, 6:22]
    q = np.concatenate([nibbles & 0xF, nibbles >> 4], axis=1) | (fifth << 4)  # [B, 32] 0..31
    q = q.view(np.int8) - np.int8(16)
    return torch.from_numpy(q.reshape(n, k)), torch.from_numpy(d)


def unpack_q6_k(raw: np.ndarray, n: int, k: int) -> dict[str, torch.Tensor]:
    """Q6_K blocks of an [n, k] tensor -> the 6-bit GEMM packs (`qmatmul.int6_gemm`):
    q6 [n, k] int8 values -32..31, q6_scales [n, k/16] int8 and q6_d [n, k/256] float16,
    w = q * scale * d.

    A block of 256 weights is 210 bytes: 128 bytes of low nibbles, 64 of top bit pairs, 16
    int8 scales (one per 16 weights, in order) and float16 d. Each half of 128 weights
    takes 64 nibble bytes and 32 bit-pair bytes: nibble byte l holds weight l in its low
    nibble and 64 + l in its high one, byte 32 + l weights 32 + l and 96 + l; bit-pair byte
    l holds the top bits of weights l, 32 + l, 64 + l and 96 + l, two bits each from the
    lowest. Stored as q + 32 (0..63).
    """
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(n * k // 256, 210)
    nibbles = blocks[:, :128].reshape(-1, 2, 2, 32)  # [B, half, byte 0-31 / 32-63, l]
    pairs = blocks[:, 128:192].reshape(-1, 2, 1, 32)  # [B, half, 1, l]
    low = np.concatenate([nibbles & 0xF, nibbles >> 4], axis=2)  # weights l + 32 j, j = 0..3
    top = (pairs >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)) & 3
    q = (low | (top << 4)).view(np.int8) - np.int8(32)  # [B, half, 4, 32]
    scales = blocks[:, 192:208].copy().view(np.int8)
    d = blocks[:, 208:210].copy().view(np.float16)
    values = (q.reshape(n, k), scales.reshape(n, k // 16), d.reshape(n, k // 256))
    return {key: torch.from_numpy(v) for key, v in zip(GEMM_PACKS, values, strict=True)}


def split_q6_k(raw: np.ndarray, n: int, k: int) -> dict[str, torch.Tensor]:
    """Q6_K blocks of an [n, k] tensor -> the 6-bit decode packs (`qmatmul.int6_linear`):
    qweight [n, k/256 * 192] uint8, each block's nibble and bit-pair bytes, and scales
    [n, k/256 * 18] uint8, its 16 int8 scales and float16 d: the file's bytes, split so
    that the values and the scales of a row each lie in one run."""
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(n, k // 256, 210)
    values = np.ascontiguousarray(blocks[:, :, :192]).reshape(n, k // 256 * 192)
    scales = np.ascontiguousarray(blocks[:, :, 192:]).reshape(n, k // 256 * 18)
    return {"qweight": torch.from_numpy(values), "scales": torch.from_numpy(scales)}


def _int6_values(packs: dict[str, torch.Tensor]) -> torch.Tensor:
    n, k = packs["qweight"].shape[0], packs["qweight"].shape[1] // 192 * 256
    out = torch.empty(n, k)
    qmatmul.int6_dequantize(packs["qweight"], packs["scales"], out)
    return out


def dequantize_q6_k(packs: dict[str, torch.Tensor]) -> torch.Tensor:
    """`unpack_q6_k`'s packs -> the float32 weights [n, k] they stand for."""
    q, scales, d = (packs[key] for key in GEMM_PACKS)
    n, k = q.shape
    w = q.float().reshape(n, k // 16, 16) * scales.float().unsqueeze(-1)
    return (w.reshape(n, k // 256, 256) * d.float().unsqueeze(-1)).reshape(n, k)


def _int4_values(packs: dict[str, torch.Tensor]) -> torch.Tensor:
    return dequantize_int4(packs["qweight"], packs["scales"], GROUP)


def _int8_values(packs: dict[str, torch.Tensor]) -> torch.Tensor:
    return dequantize_int8_blocks(packs["qweight"], packs["scales"])


_UNPACK = {"Q4_K": unpack_q4_k, "Q4_1": unpack_q4_1, "Q8_0": unpack_q8_0, "Q5_0": unpack_q5_0}


class GgufPacks:
    """The packs a model's GGUF gives its projections (see the module's docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        gguf = GgufFile(path)
        self._tensors = gguf.tensors
        arch = gguf.fields.get("general.architecture")
        # Head counts, for the row order llama.cpp gives q and k of some architectures.
        self._heads = {
            "q_proj": gguf.fields.get(f"{arch}.attention.head_count"),
            "k_proj": gguf.fields.get(f"{arch}.attention.head_count_kv"),
        }

    def type_of(self, module: str) -> str | None:
        """The GGUF type name of a projection's weight, None where the file lacks it."""
        name = gguf_name(module)
        tensor = self._tensors.get(name) if name else None
        return tensor.type_name if tensor is not None else None

    def mode_of(self, module: str) -> str:
        """ "int4" where the GGUF's 4-bit blocks serve the projection and all its stacked
        siblings, "q6k" where its Q6_K blocks do (and ragqa's kernels run them), else
        "int8"."""
        parent, _, part = module.rpartition(".")
        members = next((names for names in _SIBLINGS if part in names), (part,))
        types = {self.type_of(f"{parent}.{m}" if parent else m) for m in members}
        if types == {"Q6_K"} and qmatmul.load():
            return "q6k"
        kinds = {_EXACT.get(name or "") for name in types}
        return "int4" if kinds == {"int4"} else "int8"

    def pack(
        self,
        module: str,
        weight: torch.Tensor,
        quantize_int8: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    ) -> tuple[str, dict[str, torch.Tensor]]:
        """(mode, packs) for a projection whose float weight is [N, K].

        `quantize_int8(weight) -> {"qweight", "scales"}` packs the types the file's blocks
        cannot give as they are.
        """
        mode = self.mode_of(module)
        tensor = self._tensors.get(gguf_name(module) or "")
        n, k = weight.shape
        if mode == "int4" and not qmatmul.supports_int4(k, GROUP):
            mode = "int8"  # the int4 kernel reads blocks in pairs: rows of 64k inputs
        if mode == "q6k" and not qmatmul.supports_int6(k):
            mode = "int8"
        decode = None
        # A Q6_K tensor's rows are checked once, on its decode packs (the cheaper to expand),
        # and the order found serves its prefill packs too.
        q6k_order: tuple[bool, torch.Tensor | None] = (False, None)
        gemm: dict[str, torch.Tensor] | None = None  # unpacked for the check, kept for use
        if (
            tensor is not None
            and tensor.type_name == "Q6_K"
            and tensor.shape == (n, k)
            and qmatmul.supports_int6(k)
        ):
            if qmatmul.load():
                split = split_q6_k(tensor.data, n, k)
                q6k_order = self._model_order(module, split, _int6_values, weight)
                if mode == "q6k" and q6k_order[0]:
                    decode = _rows_in_order(split, q6k_order[1])
            else:  # no kernels to expand the decode packs (nor mode q6k): numpy expands these
                gemm = unpack_q6_k(tensor.data, n, k)
                q6k_order = self._model_order(module, gemm, dequantize_q6_k, weight)
        if mode == "q6k" and decode is None:
            if tensor is not None:
                self._warn_not_the_models(
                    module, tensor, n, k, "packing that projection as int8 from the model's weights"
                )
            mode = "int8"
        if tensor is not None and _EXACT.get(tensor.type_name) == mode:
            packs = None
            if tensor.shape == (n, k):
                q, scales = _UNPACK[tensor.type_name](tensor.data, n, k)
                found = {"qweight": q, "scales": scales}
                dims = {"scales": 1} if mode == "int4" else None  # int4 scales: [K/32, N, 2]
                values = _int4_values if mode == "int4" else _int8_values
                ok, order = self._model_order(module, found, values, weight, dims)
                if ok:
                    packs = _rows_in_order(found, order, dims)
                    if tensor.type_name == "Q4_K":
                        # The same rows' scales as the file codes them, for the prefill GEMM
                        packs.update(_rows_in_order(q4_k_codes(tensor.data, n, k), order))
            if packs is not None:
                return mode, packs
            self._warn_not_the_models(
                module, tensor, n, k, "packing that projection as int8 from the model's weights"
            )
        # Decode steps read the 6-bit packs or int8 ones; the blocks serve the integer
        # prefill GEMM, which the vocabulary projection never runs (it multiplies one row a
        # sequence).
        packs = decode if decode is not None else quantize_int8(weight)
        if (
            tensor is not None
            and tensor.type_name == "Q6_K"
            and module != "lm_head"
            and qmatmul.supports_int6(k)
        ):
            found, order = q6k_order
            if found:
                unpacked = gemm if gemm is not None else unpack_q6_k(tensor.data, n, k)
                packs = {**packs, **_rows_in_order(unpacked, order)}
            else:
                self._warn_not_the_models(
                    module, tensor, n, k, "its prefill keeps a float copy instead of the blocks"
                )
        return ("q6k" if decode is not None else "int8"), packs

    def _warn_not_the_models(
        self, module: str, tensor: GgufTensor, n: int, k: int, instead: str
    ) -> None:
        # Another model's GGUF, or rows in an order not known here: the model's own
        # weights are the truth.
        logger.warning(
            "%s: %s (%s, shape %s) does not hold the values of the model's %s [%d, %d]; %s",
            self.path,
            tensor.name,
            tensor.type_name,
            list(tensor.shape),
            module,
            n,
            k,
            instead,
        )

    def _model_order(
        self,
        module: str,
        packs: dict[str, torch.Tensor],
        values: Callable[[dict[str, torch.Tensor]], torch.Tensor],
        weight: torch.Tensor,
        row_dims: dict[str, int] | None = None,
    ) -> tuple[bool, torch.Tensor | None]:
        """(found, order): whether the packs' rows, taken in `order` (None: as they lie),
        hold the model's weight [N, K], as `values` (packs of some rows -> their float
        weights) expands them. A pack's rows run along dimension 0 unless `row_dims` names
        another. (False, None) when no order gives the model's values.

        llama.cpp's converter reorders the rows of q and k for Llama-architecture models
        (each head's two rotary halves interleaved), which transformers undoes on loading;
        the blocks run along rows, so the same reordering of whole rows undoes it here.
        """
        n = weight.shape[0]
        orders: list[torch.Tensor | None] = [None]
        heads = self._heads.get(module.rpartition(".")[2])
        if isinstance(heads, int) and heads > 0 and n % (2 * heads) == 0:
            # GGUF row r holds the model's row interleaved[r]: the inverse puts them back.
            interleaved = torch.arange(n).reshape(heads, 2, n // heads // 2).transpose(1, 2)
            orders.append(torch.argsort(interleaved.reshape(n)))
        # Rows spread over the whole tensor, every head's among them: another model's values
        # differ in every row and a wrong order moves all but a few rows of each head, so a
        # sample tells them apart as the whole did, for a fraction of the dequantization
        # (the whole took most of the 1.5B's first load after the file's parsing).
        sample = torch.linspace(0, n - 1, min(n, SAMPLE_ROWS)).round().long().unique()
        reference = weight[sample].float()
        for order in orders:
            rows = sample if order is None else order[sample]
            found = values(_rows_in_order(packs, rows, row_dims))
            # Taken as they are, the packs differ from the checkpoint by its bfloat16 rounding
            # (about 1e-3 of the weights' mean magnitude); rows out of order, by about 1x.
            if (found - reference).abs().mean() <= 0.01 * reference.abs().mean():
                return True, order
        return False, None


def _rows_in_order(
    packs: dict[str, torch.Tensor],
    order: torch.Tensor | None,
    row_dims: dict[str, int] | None = None,
) -> dict[str, torch.Tensor]:
    """The packs' rows `order` (None: all, as they lie), each pack contiguous."""
    dims = row_dims or {}
    return {
        key: (pack if order is None else pack.index_select(dims.get(key, 0), order)).contiguous()
        for key, pack in packs.items()
    }
