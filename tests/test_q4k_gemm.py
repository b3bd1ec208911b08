"""The Q4_K prefill GEMM (csrc/q4k_gemm.cpp) against integer arithmetic, the file's own
dequantized weights and itself over threads and row tiles."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from generation import qmatmul
from generation.gguf_packs import q4_k_codes, unpack_q4_k
from tests.test_gguf_packs import q4_k_blocks

pytestmark = pytest.mark.skipif(not qmatmul.load(), reason="ragqa's kernels did not build here")


def _packs(
    n: int, k: int, seed: int = 0
) -> tuple[np.ndarray, torch.Tensor, torch.Tensor, torch.Tensor]:
    raw = q4_k_blocks(n, k, seed)
    q, scales_and_zeros = unpack_q4_k(raw, n, k)
    qs, _ = qmatmul.pack_int4(q, scales_and_zeros)
    codes = q4_k_codes(raw, n, k)
    return raw, qs, codes["q4k_codes"], codes["q4k_dd"]


def _superblock_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (int8 values as float [M, K], their scales [M, K/256]): amax / 127 per
    256 inputs, rounded to nearest even, as the kernel quantizes."""
    m, k = x.shape
    blocks = x.reshape(m, k // 256, 256)
    d = blocks.abs().amax(-1) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    return torch.round(blocks * inv[..., None]).reshape(m, k), d


# N: whole 16-column tiles, a last panel of 8 and one with 5 real columns; M: 3-row tiles
# whole or with 1 or 2 last rows, and fewer rows than a tile; 1 to 3 blocks of 256.
@pytest.mark.parametrize(("n", "m", "k"), [(96, 6, 256), (40, 7, 512), (21, 2, 768)])
def test_q4k_gemm_equals_integer_arithmetic_on_int8_activations_per_256(n, m, k):
    _, qs, codes, dd = _packs(n, k, seed=n)
    x = torch.randn(m, k)
    y = qmatmul.q4k_gemm(x, qs, codes, dd)
    q = qmatmul.unpack_nibbles(qs).double()  # [n, k] 0..15
    sc, mn = codes[..., 0].double(), codes[..., 1].double()  # [n, k/32]
    d, dmin = dd[..., 0].double(), dd[..., 1].double()  # [n, k/256]
    xq, dx = _superblock_activations(x)
    # sum_j sc_j sum_{k in j} q x, per 256 inputs, exact in float64
    sums = torch.einsum(
        "nbi,mbi->mnb", q.reshape(n, k // 32, 32), xq.double().reshape(m, k // 32, 32)
    )
    per_256 = (sums * sc).reshape(m, n, k // 256, 8).sum(-1)
    main = (per_256 * d * dx.double()[:, None, :]).sum(-1)
    minimum = x.double().reshape(m, k // 32, 32).sum(-1) @ (-(dmin.repeat_interleave(8, 1)) * mn).T
    assert y.shape == (m, n) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), main + minimum, rtol=1e-5, atol=1e-5)


def test_q4k_gemm_is_the_files_weights_up_to_the_activations_int8_rounding():
    raw, qs, codes, dd = _packs(300, 1536, seed=3)
    w = torch.from_numpy(quants.dequantize(raw, GGMLQuantizationType.Q4_K))  # [300, 1536]
    x = torch.randn(37, 1536)
    expected = x.double() @ w.double().T
    error = (qmatmul.q4k_gemm(x, qs, codes, dd).double() - expected).abs().max()
    # int8 per 256 inputs: about 1 % of the largest output on gaussian inputs
    assert error <= 0.02 * expected.abs().max()


def test_q4k_gemm_sums_the_largest_products_and_codes_without_overflow():
    # Every nibble 15, every code 255 (past 6 bits) and every activation +-127: each int16
    # lane sums 8 maddubs of 2 * 15 * 127 = 30480, madd multiplies by 255 and 8 blocks add
    # up in int32 (8 * 2 * 30480 * 255 < 2^31).
    n, k = 16, 512
    qs = torch.full((n, k // 2), 0xFF, dtype=torch.uint8)
    codes = torch.full((n, k // 32, 2), 255, dtype=torch.uint8)
    dd = torch.stack([torch.full((n, k // 256), 1e-3), torch.full((n, k // 256), 2e-3)], -1).half()
    x = torch.cat([torch.ones(1, k), -torch.ones(1, k)]) * 3.0
    w = 15 * 255 * dd[..., 0].float().repeat_interleave(256, 1) - 255 * dd[
        ..., 1
    ].float().repeat_interleave(256, 1)
    torch.testing.assert_close(qmatmul.q4k_gemm(x, qs, codes, dd), x @ w.T, rtol=1e-5, atol=0)


def test_q4k_gemm_gives_the_same_floats_whatever_the_threads_and_row_tiles():
    # 1000 columns: 63 groups of 16, the last one short; 7 rows: two 3-row tiles and a row.
    _, qs, codes, dd = _packs(1000, 512, seed=5)
    x = torch.randn(7, 512)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = qmatmul.q4k_gemm(x, qs, codes, dd)
        torch.set_num_threads(1)
        one = qmatmul.q4k_gemm(x, qs, codes, dd)
    finally:
        torch.set_num_threads(threads)
    alone = torch.cat([qmatmul.q4k_gemm(x[i : i + 1], qs, codes, dd) for i in range(7)])
    assert torch.equal(one, two) and torch.equal(one, alone)


def test_q4k_gemm_rejects_inputs_that_are_not_whole_blocks_of_256():
    _, qs, codes, dd = _packs(16, 512)
    with pytest.raises(RuntimeError, match="multiple of 256, got 384"):
        qmatmul.q4k_gemm(torch.randn(3, 384), qs[:, :192], codes[:, :12], dd[:, :1])
