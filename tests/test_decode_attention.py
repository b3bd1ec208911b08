"""ragqa's decode-attention kernel (float32 or bfloat16 caches) against a float64 reference,
and when it is used."""

import shutil

import pytest
import torch

from generation import attention, qmatmul

if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
    pytest.skip("the kernels need an AVX2 CPU", allow_module_level=True)
if shutil.which("c++") is None and shutil.which("g++") is None:
    pytest.skip("no C++ compiler to build the kernels with", allow_module_level=True)


@pytest.fixture(scope="module", autouse=True)
def built():
    assert qmatmul.load(), "the kernels failed to build (see the log)"


def _reference(query, key, value, mask, scale):
    """query [B, Hq, 1, D], key/value [B, Hkv, T, D], mask [B, T] -> [B, 1, Hq, D], float64."""
    b, hq, _, d = query.shape
    hkv = key.shape[1]
    grouped = query.double().reshape(b, hkv, hq // hkv, d)
    scores = grouped @ key.double().transpose(-1, -2) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    out = torch.softmax(scores, dim=-1) @ value.double()
    return out.reshape(b, hq, 1, d).transpose(1, 2)


def _cache(b, hkv, t, d, slack=5):
    """A cache as the engine holds it: a view of the first t positions of a longer buffer."""
    return torch.randn(b, hkv, t + slack, d)[:, :, :t]


@pytest.mark.parametrize(
    "b, hq, hkv, d, t",
    [
        (1, 12, 2, 128, 640),  # the 1.5B's heads
        (1, 14, 2, 64, 601),  # the 0.5B's
        (3, 9, 3, 16, 37),
        (2, 8, 8, 64, 5),  # no grouping
        (1, 4, 1, 8, 1),  # the first step after a one-token prompt
        (2, 7, 1, 24, 13),  # a head size that is not a multiple of 32
    ],
)
def test_kernel_matches_a_float64_reference_with_grouped_heads(b, hq, hkv, d, t):
    torch.manual_seed(0)
    query = torch.randn(b, hq, 1, d)
    key, value = _cache(b, hkv, t, d) * 2, _cache(b, hkv, t, d)
    mask = torch.ones(b, t, dtype=torch.bool)
    if b > 1:
        mask[1, : min(4, t - 1)] = False  # the second row is left-padded
    out = qmatmul.decode_attention(query.reshape(b, hq, d), key, value, mask, d**-0.5)
    ref = _reference(query, key, value, mask, d**-0.5)
    assert out.shape == (b, hq, d)
    assert (out.view(b, 1, hq, d).double() - ref).abs().max() < 2e-6


def test_kernel_reads_a_bfloat16_cache_as_the_same_values_in_float32():
    torch.manual_seed(3)
    b, hq, hkv, d, t = 2, 12, 2, 128, 203
    query = torch.randn(b, hq, d)
    # bfloat16 views of longer buffers, as the engine's caches are
    key = _cache(b, hkv, t, d).bfloat16() * 2
    value = _cache(b, hkv, t, d).bfloat16()
    key, value = key[:, :, : t - 3], value[:, :, : t - 3]
    mask = torch.ones(b, t - 3, dtype=torch.bool)
    mask[1, :5] = False
    narrow = qmatmul.decode_attention(query, key, value, mask, d**-0.5)
    wide = qmatmul.decode_attention(query, key.float(), value.float(), mask, d**-0.5)
    assert narrow.dtype == torch.float32
    assert torch.equal(narrow, wide)


def test_a_cache_of_two_dtypes_is_rejected():
    query, key = torch.randn(1, 4, 16), _cache(1, 2, 4, 16)
    with pytest.raises(RuntimeError, match="must both be float32 or both bfloat16"):
        qmatmul.decode_attention(query, key, key.bfloat16(), None, 0.25)
    with pytest.raises(RuntimeError, match="query must be float32"):
        qmatmul.decode_attention(query.bfloat16(), key.bfloat16(), key.bfloat16(), None, 0.25)


def test_masked_positions_are_never_read():
    torch.manual_seed(1)
    query = torch.randn(2, 6, 1, 32)
    key, value = _cache(2, 2, 20, 32), _cache(2, 2, 20, 32)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1, :7] = False
    clean = qmatmul.decode_attention(query.reshape(2, 6, 32), key, value, mask, 0.2)
    key[1, :, :7], value[1, :, :7] = float("nan"), float("inf")
    dirty = qmatmul.decode_attention(query.reshape(2, 6, 32), key, value, mask, 0.2)
    assert torch.equal(clean, dirty)
    unmasked = qmatmul.decode_attention(query.reshape(2, 6, 32), key, value, None, 0.2)
    assert unmasked[1].isnan().all()  # without the mask the NaN keys are read, as in torch
    assert torch.equal(unmasked[0], clean[0])


def test_bad_shapes_are_rejected_with_the_sizes():
    query, key = torch.randn(1, 5, 16), _cache(1, 2, 4, 16)
    with pytest.raises(RuntimeError, match=r"query heads \(5\) must be a multiple"):
        qmatmul.decode_attention(query, key, key, None, 0.25)
    with pytest.raises(RuntimeError, match="mask must be"):
        qmatmul.decode_attention(torch.randn(1, 4, 16), key, key, torch.ones(1, 3).bool(), 0.25)


def test_decode_attention_takes_the_kernel_for_float32_and_bfloat16_and_torch_for_float16(
    monkeypatch,
):
    calls = []
    kernel = qmatmul.decode_attention
    monkeypatch.setattr(qmatmul, "decode_attention", lambda *a: calls.append(1) or kernel(*a))
    torch.manual_seed(2)
    query, key, value = torch.randn(2, 6, 1, 16), _cache(2, 2, 9, 16), _cache(2, 2, 9, 16)
    mask = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    mask[1, ..., :3] = False
    out, _ = attention.decode_attention(None, query, key, value, mask, scaling=0.25)
    assert calls == [1]
    assert out.shape == (2, 1, 6, 16)
    ref = _reference(query, key, value, mask[:, 0, 0], 0.25)
    assert (out.double() - ref).abs().max() < 2e-6
    half, _ = attention.decode_attention(
        None, query.bfloat16(), key.bfloat16(), value.bfloat16(), mask, scaling=0.25
    )
    assert calls == [1, 1] and half.dtype == torch.bfloat16
    assert (half.double() - ref).abs().max() < 5e-2
    half, _ = attention.decode_attention(
        None, query.half(), key.half(), value.half(), mask, scaling=0.25
    )
    assert calls == [1, 1] and half.dtype == torch.float16
    assert (half.double() - ref).abs().max() < 5e-3
