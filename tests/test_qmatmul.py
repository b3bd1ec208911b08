"""The int4/int8 x int8 kernels: layout, arithmetic and error bounds against float references."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from generation import qmatmul
from generation.gguf_packs import split_q6_k, unpack_q6_k
from generation.quant import (
    QuantizedLinear,
    dequantize_int4,
    dequantize_int8_blocks,
    quantize_int4,
    quantize_int8_blocks,
)

if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
    pytest.skip("the kernels need an AVX2 CPU", allow_module_level=True)
if shutil.which("c++") is None and shutil.which("g++") is None:
    pytest.skip("no C++ compiler to build the kernels with", allow_module_level=True)


@pytest.fixture(scope="module", autouse=True)
def built():
    # With a compiler and AVX2 present, a failed build is a bug, not a reason to skip.
    assert qmatmul.load(), "the kernels failed to build (see the log)"


@pytest.fixture(params=qmatmul.KERNEL_ISAS)
def isa(request):
    """Runs a test on each instruction set's kernels this CPU has (skips the others)."""
    if request.param not in qmatmul.available_kernel_isas():
        pytest.skip(f"this CPU cannot run the {request.param} kernels")
    previous = qmatmul.set_kernel_isa(request.param)
    yield request.param
    qmatmul.set_kernel_isa(previous)


@pytest.fixture(params=[1, 2], ids=["one-part", "two-part"])
def parts(request):
    """Runs a test with the decode kernels' activations in one int8 part and in two."""
    previous = qmatmul.set_two_part_activations(request.param == 2)
    yield request.param
    qmatmul.set_two_part_activations(previous)


@pytest.fixture
def one_part():
    """The decode kernels with one-part activations: the prefill GEMMs' rounding."""
    previous = qmatmul.set_two_part_activations(False)
    yield
    qmatmul.set_two_part_activations(previous)


def _weights(n=96, k=256, g=64, seed=0):
    torch.manual_seed(seed)
    w = torch.randn(n, k) * 0.05
    q, sz = quantize_int4(w, g)
    qs, sm = qmatmul.pack_int4(q, sz)
    return q, sz, qs, sm


def _float_weight(q, sm, g):
    """The weight the kernel's layout stores (fp16 scale and minimum), as float [N, K]."""
    n, k = q.shape
    s, m = sm[..., 0].float(), sm[..., 1].float()
    return (q.reshape(n, k // g, g).float() * s[..., None] + m[..., None]).reshape(n, k)


def _quantized_activations(x, parts=1):
    """The activations the kernels multiply and each block's largest rounding error, [M,
    K/32]: d / 2 in one int8 part (d = max|x| / 127), d / 512 in two, whose second rounds
    what the first leaves at a step of d / 256 (within -127..127). Rounded as the kernels
    round: times 1 / d in float32, the residual exact before its one rounding (an fma)."""
    blocks = x.reshape(x.shape[0], -1, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    coarse = torch.round(blocks * inv)
    if parts == 1:
        return (coarse * d).reshape(x.shape), (d / 2).squeeze(-1)
    residual = (blocks.double() - coarse.double() * d.double()).float()
    fine = torch.clamp(torch.round(residual * (inv * 256)), -127, 127)
    value = coarse.double() * d.double() + fine.double() * (d.double() / 256)
    return value.float().reshape(x.shape), (d / 512).squeeze(-1)


def test_packed_layout_dequantizes_to_the_same_weights_as_quantize_int4():
    q, sz, _, sm = _weights()
    ours = _float_weight(q, sm, 64)
    reference = dequantize_int4(q, sz, 64)
    # fp16 scale and minimum: relative rounding 2^-11 of values about the weight range
    assert (ours - reference).abs().max() < 2e-3 * reference.abs().max()


def test_nibbles_unpack_to_the_values_they_were_packed_from():
    q = torch.randint(0, 16, (5, 192), dtype=torch.uint8)
    packed = qmatmul.pack_nibbles(q)
    assert packed.shape == (5, 96)
    assert torch.equal(qmatmul.unpack_nibbles(packed), q)


# 256: whole groups of 4 blocks; 1088: two groups of 16 blocks and a last pair (AVX-512)
@pytest.mark.parametrize("k", [256, 1088])
def test_int4_kernel_equals_integer_arithmetic_on_int8_activations(isa, parts, k):
    g = 64
    q, _, qs, sm = _weights(k=k, g=g)
    x = torch.randn(5, k)
    y = qmatmul.int4_linear(x, qs, sm, g)
    xq, _ = _quantized_activations(x, parts)
    n, k = q.shape
    scaled = (q.reshape(n, k // g, g).float() * sm[..., 0].float()[..., None]).reshape(n, k)
    # the minimum term uses the exact float activations, the scaled term the int8 ones
    expected = xq @ scaled.T + x.reshape(5, k // g, g).sum(-1) @ sm[..., 1].float().T
    assert torch.allclose(y, expected, atol=1e-4, rtol=1e-5)


# Scales of 8 (AVX2) or 16 (AVX-512) blocks at once for groups of 1, 2, 4 or 8 blocks;
# block by block for 3 (96) and for the blocks after the last whole 8 or 16 (320, 704).
@pytest.mark.parametrize(
    ("group", "k"),
    [(32, 512), (64, 512), (128, 512), (256, 512), (96, 384), (32, 320), (32, 704), (64, 704)],
)
def test_int4_kernel_error_against_float_weights_stays_within_activation_rounding_bound(
    isa, parts, group, k
):
    q, _, qs, sm = _weights(n=64, k=k, g=group)
    x = torch.randn(3, k)
    w = _float_weight(q, sm, group)
    err = (qmatmul.int4_linear(x, qs, sm, group).double() - x.double() @ w.double().T).abs()
    # each activation moves by at most half its block's step: d = max|x| / 127 in one
    # part, d / 256 in two
    _, half_step = _quantized_activations(x, parts)
    bound = half_step.double() @ w.abs().reshape(64, -1, 32).sum(-1).double().T
    assert (err <= bound + 1e-5).all()
    assert err.max() > 0  # the activations really are quantized


# whole groups of 8 blocks; 8 blocks plus a tail of 2; 16 blocks plus 4 and a last pair
@pytest.mark.parametrize("k", [256, 320, 704])
def test_rows_are_computed_independently_for_every_tile_size(isa, parts, k):
    _, _, qs, sm = _weights(k=k)
    q8, s8 = quantize_int8_blocks(torch.randn(96, k))
    x = torch.randn(7, k)  # one tile of 4 and one of 3
    for fn in (
        lambda v: qmatmul.int4_linear(v, qs, sm, 64),
        lambda v: qmatmul.int8_linear(v, q8, s8),
    ):
        together = fn(x)
        alone = torch.cat([fn(x[i : i + 1]) for i in range(7)])
        assert torch.equal(together, alone)


# 320: 10 blocks (AVX2: 8 and 2 one at a time); 608: 19 blocks (AVX-512: 16 and 3)
@pytest.mark.parametrize("k", [320, 608])
def test_int8_kernel_equals_integer_arithmetic_and_stays_within_rounding_bound(isa, parts, k):
    torch.manual_seed(0)
    w = torch.randn(80, k) * 0.05
    w[5, 64:96] *= 40  # an outlier block: its own scale, not its row's
    w[9, k - 32 :] *= 40  # and one among the blocks after the last whole 8 or 16
    q8, s8 = quantize_int8_blocks(w)
    assert s8.shape == (80, k // 32) and s8[5, 2] > 20 * s8[5, 1]
    x = torch.randn(3, k)
    y = qmatmul.int8_linear(x, q8, s8)
    xq, half_step = _quantized_activations(x, parts)
    wq = dequantize_int8_blocks(q8, s8)
    assert (wq - w).abs().max() <= s8.float().max() / 2 + 1e-6
    assert torch.allclose(y, xq @ wq.T, atol=1e-4, rtol=1e-5)
    err = (y.double() - x.double() @ wq.double().T).abs()
    bound = half_step.double() @ wq.abs().reshape(80, -1, 32).sum(-1).double().T
    assert (err <= bound + 1e-5).all() and err.max() > 0


def test_both_instruction_sets_sum_the_same_products_and_differ_only_in_float_rounding(parts):
    available = qmatmul.available_kernel_isas()
    if "avx512-vnni" not in available:
        pytest.skip("this CPU has only the AVX2 kernels")
    _, _, qs, sm = _weights(n=64, k=1088, g=32)
    q8, s8 = quantize_int8_blocks(torch.randn(64, 1088) * 0.05)
    x = torch.randn(4, 1088)
    qw6, sw6, _ = _q6_k_packs(_q6_k_raw(48, 1024), 48, 1024)
    x6 = torch.randn(4, 1024)
    outputs = {}
    previous = qmatmul.kernel_isa()
    try:
        for isa in available:
            qmatmul.set_kernel_isa(isa)
            outputs[isa] = (
                qmatmul.int4_linear(x, qs, sm, 32),
                qmatmul.int8_linear(x, q8, s8),
                qmatmul.int6_linear(x6, qw6, sw6),
            )
    finally:
        qmatmul.set_kernel_isa(previous)
    for a, b in zip(outputs["avx2"], outputs["avx512-vnni"], strict=True):
        # float32 sums of ~1000 products in another order: a few units of the last place
        assert (a - b).abs().max() <= 1e-5 * a.abs().max()


def test_an_unknown_instruction_set_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="avx2"):
        qmatmul.set_kernel_isa("sse4")
    assert qmatmul.kernel_isa() in qmatmul.KERNEL_ISAS


def test_kernel_rejects_a_group_that_does_not_divide_the_inputs():
    _, _, qs, sm = _weights()
    with pytest.raises(RuntimeError, match="group must be a multiple of 32"):
        qmatmul.int4_linear(torch.randn(1, 256), qs, sm, 48)


@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_quantized_linear_uses_our_kernel_and_agrees_with_torchs(mode):
    torch.manual_seed(0)
    dense = nn.Linear(256, 96)
    x = torch.randn(2, 256)
    ours = QuantizedLinear(dense, mode, group_size=64)
    theirs = QuantizedLinear(dense, mode, group_size=64, use_kernel=False)
    assert ours.kernel and not theirs.kernel
    a, b = ours(x), theirs(x)
    assert a.dtype == x.dtype
    assert (a - b).abs().max() < 0.02 * b.abs().max()


def test_kernels_take_only_whole_blocks_that_divide_the_inputs():
    assert qmatmul.supports_int4(256, 64) and qmatmul.supports_int4(192, 32)
    assert not qmatmul.supports_int4(256, 48)  # not whole blocks of 32
    assert not qmatmul.supports_int4(192, 128)  # 128 does not divide 192
    assert not qmatmul.supports_int4(96, 32)  # int4 blocks come in pairs: 64 inputs
    assert qmatmul.supports_int8(96) and not qmatmul.supports_int8(100)
    torch.manual_seed(0)
    odd = QuantizedLinear(nn.Linear(100, 8), "int8")
    assert not odd.kernel  # torch's kernel takes it instead
    x = torch.randn(1, 100)
    assert torch.allclose(odd(x), x @ odd.weight.T + odd.bias, atol=0.05)


def _tiny_llama(attention_bias: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_bias=attention_bias,
    )
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_fused_sibling_projections_give_the_same_decode_logits_with_fewer_kernel_calls(
    mode, monkeypatch
):
    from generation.quant_load import quantize_model

    fused, plain = _tiny_llama(True), _tiny_llama(True)
    assert quantize_model(fused, mode, fuse=True)["fused_groups"] == 4  # 2 layers x (qkv, mlp)
    assert quantize_model(plain, mode, fuse=False)["fused_groups"] == 0
    calls = {"n": 0}
    for name in ("int8_linear", "int4_linear"):
        real = getattr(qmatmul, name)

        def counted(*args, _real=real):
            calls["n"] += 1
            return _real(*args)

        monkeypatch.setattr(qmatmul, name, counted)
    prompt = torch.tensor([[5, 17, 42, 99, 7, 250, 3, 64]])
    counts, outputs = [], []
    with torch.inference_mode():
        for model in (plain, fused):
            out = model(prompt, use_cache=True)  # prefill: float weights, no kernel calls
            calls["n"] = 0
            step = model(torch.tensor([[11]]), past_key_values=out.past_key_values)
            counts.append(calls["n"])
            outputs.append(step.logits)
    # per layer 7 projections -> o, down, qkv, gate+up; plus the vocabulary projection
    assert counts == [2 * 7 + 1, 2 * 4 + 1]
    assert torch.equal(outputs[0], outputs[1])


def test_a_fused_projection_called_out_of_order_still_computes_its_own_input():
    from generation.quant_load import quantize_model

    model = _tiny_llama(True)
    quantize_model(model, "int4", fuse=True)
    attn = model.model.layers[0].self_attn
    a, b = torch.randn(1, 128), torch.randn(1, 128)
    with torch.inference_mode():
        q_a = attn.q_proj(a)  # computes q, k, v for `a` and keeps k and v for it
        k_b = attn.k_proj(b)  # another input: must not get a's keys
        expected = qmatmul.int4_linear(b, attn.k_proj.qweight, attn.k_proj.scales, 64)
        assert torch.equal(k_b, expected + attn.k_proj.bias)
        assert not torch.equal(k_b, attn.k_proj(a))
        assert q_a.shape == (1, 128)


def test_a_lock_file_left_by_a_killed_build_does_not_make_the_next_load_wait(tmp_path):
    # A copy of this machine's build, in a TORCH_EXTENSIONS_DIR of the test's own, with the
    # `lock` file torch leaves behind when a build is killed midway.
    built = qmatmul.build_directory()
    root = tmp_path / "extensions"
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(root)}
    probe = "from generation import qmatmul; print(qmatmul.build_directory())"
    folder = Path(_run_python(probe, env, timeout=60).stdout.strip())
    shutil.copytree(built, folder)
    (folder / "lock").touch()

    done = _run_python(
        "from generation import qmatmul; assert qmatmul.load(), 'load failed'", env, timeout=300
    )

    assert done.returncode == 0, done.stderr
    assert not (folder / "lock").exists()
    assert "left by a kernel build that did not finish" in done.stderr


def _run_python(code: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            [sys.executable, "-c", code],
            env=env,
            cwd=Path(__file__).parent.parent,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"`{code}` still waiting after {timeout} s")


# N: whole tiles of 16 columns (AVX-512: 32), a last panel of 8, and a panel with 5 real
# columns of 8; M: tiles of 3 rows (AVX-512: 4), whole or with last rows alone, and fewer
# rows than a tile; groups of 1, 2 and 3 blocks.
@pytest.mark.parametrize(
    ("n", "m", "k", "g"), [(96, 6, 256, 64), (40, 5, 192, 32), (21, 2, 384, 96)]
)
def test_int4_gemm_equals_integer_arithmetic_on_int8_activations(n, m, k, g, isa):
    q, _, qs, sm = _weights(n=n, k=k, g=g)
    x = torch.randn(m, k)
    y = qmatmul.int4_gemm(x, qs, sm, g)
    xq, _ = _quantized_activations(x)
    scaled = (q.reshape(n, k // g, g).float() * sm[..., 0].float()[..., None]).reshape(n, k)
    expected = xq @ scaled.T + x.reshape(m, k // g, g).sum(-1) @ sm[..., 1].float().T
    assert y.shape == (m, n)
    assert torch.allclose(y, expected, atol=1e-4, rtol=1e-5)


def test_int4_gemm_sums_the_decode_kernels_products_in_int16_without_overflow(isa):
    # Every weight 15 and every activation +-127 (a block of equal values): each int16 lane
    # sums 8 maddubs of 2 * 15 * 127, 30480, the most a block can give (2^15 - 1 = 32767).
    k, n = 128, 16
    q = torch.full((n, k), 15, dtype=torch.uint8)
    sz = torch.stack([torch.full((k // 32, n), 0.01), torch.full((k // 32, n), 0.08)], -1)
    qs, sm = qmatmul.pack_int4(q, sz)
    x = torch.cat([torch.ones(1, k), -torch.ones(1, k)]) * 3.0
    y = qmatmul.int4_gemm(x, qs, sm, 32)
    assert torch.allclose(y, x @ _float_weight(q, sm, 32).T, rtol=1e-5)
    assert torch.allclose(y, qmatmul.int4_linear(x, qs, sm, 32), rtol=1e-6)


def test_int4_gemm_matches_the_one_part_decode_kernel_up_to_float_rounding_on_a_model_shape(
    isa, one_part
):
    _, _, qs, sm = _weights(n=300, k=1536, g=32)
    x = torch.randn(37, 1536)
    gemm, decode = qmatmul.int4_gemm(x, qs, sm, 32), qmatmul.int4_linear(x, qs, sm, 32)
    assert (gemm - decode).abs().max() <= 1e-5 * decode.abs().max()


def test_int4_gemm_rejects_a_group_that_does_not_divide_the_inputs():
    _, _, qs, sm = _weights(k=256, g=64)
    with pytest.raises(RuntimeError, match="group must be a multiple of 32 dividing K"):
        qmatmul.int4_gemm(torch.randn(20, 256), qs, sm, 48)


def _q5_weights(n, k, seed=0):
    """int8 packs as a GGUF's Q5_0 blocks give them: values -16..15, a scale per 32."""
    torch.manual_seed(seed)
    return torch.randint(-16, 16, (n, k), dtype=torch.int8), (torch.rand(n, k // 32) * 0.01).half()


@pytest.mark.parametrize(("n", "m", "k"), [(96, 6, 256), (21, 3, 96)])
def test_int8_gemm_of_5_bit_values_equals_integer_arithmetic_on_int8_activations(
    n, m, k, isa, one_part
):
    q, d = _q5_weights(n, k)
    x = torch.randn(m, k)
    xq, _ = _quantized_activations(x)
    w = dequantize_int8_blocks(q, d)
    assert torch.allclose(qmatmul.int8_gemm(x, q, d), xq @ w.T, atol=1e-5, rtol=1e-5)
    assert torch.allclose(qmatmul.int8_gemm(x, q, d), qmatmul.int8_linear(x, q, d), atol=1e-5)


def test_int8_gemm_sums_the_extreme_5_bit_products_without_overflow(isa):
    # -16 against -127 and 15 against 127 in every position: each int16 lane sums 4
    # maddubs of at most 2 * 31 * 127 (7874) after the +16 offset; 31496 < 2^15.
    k = 64
    q = torch.cat([torch.full((8, k), -16), torch.full((8, k), 15)]).to(torch.int8)
    d = torch.full((16, k // 32), 0.01).half()
    x = torch.cat([torch.full((1, k), -2.0), torch.full((1, k), 2.0)])
    expected = x @ dequantize_int8_blocks(q, d).T
    assert torch.allclose(qmatmul.int8_gemm(x, q, d), expected, rtol=1e-5)


def test_int8_gemm_refuses_values_outside_5_bits_instead_of_wrapping_them(isa):
    q, d = _q5_weights(24, 64)
    q[17, 40] = 16
    assert not qmatmul.narrow_int8(q)
    with pytest.raises(RuntimeError, match=r"int8 weights in -16\.\.15"):
        qmatmul.int8_gemm(torch.randn(20, 64), q, d)


def _q6_weights(n, k, seed=0):
    """6-bit packs as a GGUF's Q6_K blocks give them: values -32..31, an int8 scale per 16
    inputs and a float16 d per 256."""
    torch.manual_seed(seed)
    q = torch.randint(-32, 32, (n, k), dtype=torch.int8)
    scales = torch.randint(-128, 128, (n, k // 16), dtype=torch.int8)
    return q, scales, (torch.rand(n, k // 256) * 1e-3).half()


def _q6_values(q, scales, d):
    n, k = q.shape
    w = (q.float().reshape(n, k // 16, 16) * scales.float().unsqueeze(-1)).reshape(n, -1, 256)
    return (w * d.float().unsqueeze(-1)).reshape(n, k)


# N: whole tiles, then a last panel of 5 columns, and one panel alone; M odd and even.
@pytest.mark.parametrize(("n", "m", "k"), [(96, 6, 512), (21, 3, 256), (8, 17, 768)])
def test_int6_gemm_equals_integer_arithmetic_on_int8_activations(n, m, k, isa):
    q, scales, d = _q6_weights(n, k)
    x = torch.randn(m, k)
    xq, _ = _quantized_activations(x)
    expected = xq.double() @ _q6_values(q, scales, d).double().T
    y = qmatmul.int6_gemm(x, q, scales, d)
    assert y.shape == (m, n)
    assert torch.allclose(y.double(), expected, atol=1e-5, rtol=1e-5)


def test_int6_gemm_sums_the_extreme_6_bit_products_without_overflow(isa):
    # -32 and 31 against x + 128 = 255 and 1 in every position, scales -128 and 127: each
    # int16 lane sums 2 maddubs of up to 2 * 255 * 32 (16320); the int32 block sums reach
    # 2 * 16 * 255 * 32 * 128 plus the panel's offset term.
    k = 256
    q = torch.cat([torch.full((8, k), -32), torch.full((8, k), 31)]).to(torch.int8)
    scales = torch.cat([torch.full((8, k // 16), -128), torch.full((8, k // 16), 127)])
    scales = scales.to(torch.int8)
    d = torch.ones(16, 1).half()
    x = torch.cat([torch.full((1, k), 2.0), torch.full((1, k), -2.0)])
    expected = x.double() @ _q6_values(q, scales, d).double().T
    assert torch.equal(qmatmul.int6_gemm(x, q, scales, d).double(), expected)


def test_int6_gemm_refuses_values_outside_6_bits_instead_of_wrapping_them(isa):
    q, scales, d = _q6_weights(24, 256)
    q[17, 40] = 32
    with pytest.raises(RuntimeError, match=r"int8 weights in -32\.\.31"):
        qmatmul.int6_gemm(torch.randn(20, 256), q, scales, d)


def test_int6_gemm_rejects_inputs_that_are_not_whole_blocks_of_256():
    q, scales, d = _q6_weights(8, 256)
    with pytest.raises(RuntimeError, match="K must be a multiple of 256, got 128"):
        qmatmul.int6_gemm(torch.randn(20, 128), q[:, :128], scales[:, :8], d)


# N: whole tiles, a last AVX-512 tile of 16 + 5 columns and an AVX2 panel of 5; M with
# rows left after the last whole tile.
@pytest.mark.parametrize(("n", "m"), [(96, 6), (53, 7), (21, 5)])
def test_prefill_gemms_write_bfloat16_outputs_bit_for_bit_as_the_float32_ones_rounded(n, m, isa):
    k = 512
    _, _, qs, sm = _weights(n=n, k=k, g=64)
    q5, d5 = _q5_weights(n, k)
    q6, scales6, d6 = _q6_weights(n, k)
    x = torch.randn(m, k).bfloat16()
    x[0, :4] = torch.tensor([3e38, -3e38, 1e-40, 0.0])  # large, subnormal and zero inputs
    for gemm in (
        lambda a: qmatmul.int4_gemm(a, qs, sm, 64),
        lambda a: qmatmul.int8_gemm(a, q5, d5),
        lambda a: qmatmul.int6_gemm(a, q6, scales6, d6),
    ):
        y, wide = gemm(x), gemm(x.float())
        assert y.dtype == torch.bfloat16 and wide.dtype == torch.float32
        # Equal bits, NaN and infinities included (3e38 times a weight overflows).
        assert torch.equal(y.view(torch.int16), wide.to(torch.bfloat16).view(torch.int16))


def test_prefill_gemms_give_the_same_floats_whatever_the_threads_and_row_tiles():
    # Threads claim column groups as they go (which thread takes which varies from call to
    # call); 1000 columns are 63 groups of 16 (AVX-512: 32 of 32), the last one short.
    # 7 rows are 3-row tiles and a last row (int4), or 2-row ones (5- and 6-bit; AVX-512
    # 4): each row alone takes the 1-row tile, which must give the same floats.
    n, m, k = 1000, 7, 512
    x = torch.randn(m, k)
    _, _, qs, sm = _weights(n=n, k=k, g=32)
    q5, s5 = _q5_weights(n, k)
    q6, c6, d6 = _q6_weights(n, k)

    def products(rows=x):
        return (
            qmatmul.int4_gemm(rows, qs, sm, 32),
            qmatmul.int8_gemm(rows, q5, s5),
            qmatmul.int6_gemm(rows, q6, c6, d6),
        )

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = products()
        torch.set_num_threads(1)
        one = products()
    finally:
        torch.set_num_threads(threads)
    rows = [products(x[i : i + 1]) for i in range(m)]
    alone = [torch.cat([r[j] for r in rows]) for j in range(3)]
    for a, b, c in zip(one, two, alone, strict=True):
        assert torch.equal(a, b)
        assert torch.equal(a, c)


def _q6_k_raw(n, k, seed=0):
    """Random Q6_K bytes [n, k/256 * 210] (any values and scales, d about 1e-3)."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(n * k // 256, 210), dtype=np.uint8)
    d = (rng.uniform(0.5, 1.0, len(raw)) * 1e-3).astype(np.float16)
    raw[:, 208:210] = d.view(np.uint8).reshape(-1, 2)
    return raw.reshape(n, -1)


def _q6_k_packs(raw, n, k):
    """(decode packs qweight, scales; the exact weights [n, k] as float64), the latter from
    gguf_packs.unpack_q6_k, which equals gguf's own dequantizer (test_gguf_packs)."""
    decode = split_q6_k(raw, n, k)
    exact = unpack_q6_k(raw, n, k)
    return decode["qweight"], decode["scales"], _q6_values(*exact.values()).double()


# M: one decode row, a tile of 3, a whole tile of 4 and one more; K: 1 and 4 superblocks.
@pytest.mark.parametrize(("n", "m", "k"), [(21, 1, 256), (40, 3, 1024), (17, 5, 512), (8, 4, 256)])
def test_int6_linear_equals_integer_arithmetic_on_int8_activations(isa, parts, n, m, k):
    qw, sw, weight = _q6_k_packs(_q6_k_raw(n, k, seed=n), n, k)
    x = torch.randn(m, k)
    xq, _ = _quantized_activations(x, parts)
    y = qmatmul.int6_linear(x, qw, sw)
    assert y.shape == (m, n)
    assert torch.allclose(y.double(), xq.double() @ weight.T, atol=1e-5, rtol=1e-5)


def test_int6_linear_gives_each_row_the_same_floats_alone_or_in_a_batch(isa, parts):
    qw, sw, _ = _q6_k_packs(_q6_k_raw(33, 768), 33, 768)
    x = torch.randn(7, 768)
    rows = torch.cat([qmatmul.int6_linear(x[i : i + 1], qw, sw) for i in range(7)])
    assert torch.equal(qmatmul.int6_linear(x, qw, sw), rows)


def test_int6_linear_sums_the_extreme_6_bit_products_without_overflow(isa, one_part):
    # Stored 63 (q = 31) and 0 (q = -32) against activations of 127 and -127, scales 127
    # and -128: an AVX2 maddubs lane reaches 2 * 63 * 127, an AVX-512 vpdpbusd lane (x + 128
    # times q) 4 * 255 * 31 from its start, the block sums 32 * 63 * 127 * 128.
    k = 256
    raw = np.zeros((2, 210), dtype=np.uint8)
    raw[0, :192], raw[0, 192:208] = 0xFF, 0x7F  # every value 63, every scale 127
    raw[1, :192], raw[1, 192:208] = 0x00, 0x80  # every value 0, every scale -128
    raw[:, 208:210] = np.full(2, 1.0, np.float16).view(np.uint8).reshape(2, 2)
    qw, sw, weight = _q6_k_packs(raw, 2, k)
    x = torch.cat([torch.full((1, k), 2.0), torch.full((1, k), -2.0)])
    assert torch.equal(qmatmul.int6_linear(x, qw, sw).double(), x.double() @ weight.T)


def _largest_two_part_activations(m, k):
    """Rows whose every block rounds to the largest parts: 126 then 127 (the residual
    0.496 of a step at 1/256 of it), or -126 and -127, with one value per block setting
    the step to 1; alternate rows negated."""
    x = torch.full((m, k), 126.496)
    x[:, ::32] = 127.0
    x[1::2] *= -1
    return x


def test_two_part_activations_sum_the_largest_products_without_overflow(isa):
    # int4 15, int8 +-127 and 6-bit 31 / -32 against both parts at their largest: an int8
    # block sums 32 * 127 * (126 * 256 + 127) in int32, an AVX-512 lane 4 * 127 * that.
    assert qmatmul.two_part_activations()  # the default
    k = 512
    x = _largest_two_part_activations(4, k)
    xq, _ = _quantized_activations(x, 2)
    assert torch.equal(xq, torch.where(x.abs() == 127, x, torch.sign(x) * (126 + 127 / 256)))
    q4 = torch.full((2, k), 15, dtype=torch.uint8)
    qs = qmatmul.pack_nibbles(q4)
    sm = torch.stack([torch.ones(2, k // 32), torch.zeros(2, k // 32)], -1).half()
    y4 = qmatmul.int4_linear(x, qs, sm, 32).double()
    assert torch.allclose(y4, xq.double() @ torch.full((2, k), 15.0).double().T, rtol=1e-6)
    w8 = torch.full((2, k), 127, dtype=torch.int8)
    w8[1] = -127
    d8 = torch.ones(2, k // 32, dtype=torch.float16)
    y8 = qmatmul.int8_linear(x, w8, d8).double()
    assert torch.allclose(y8, xq.double() @ w8.double().T, rtol=1e-6)
    raw = np.zeros((2, k // 256, 210), dtype=np.uint8)
    raw[0, :, :192], raw[0, :, 192:208] = 0xFF, 0x01  # every value 31, every scale 1
    raw[1, :, :192], raw[1, :, 192:208] = 0x00, 0x01  # every value -32
    raw[:, :, 208:210] = np.full((2, k // 256), 1.0, np.float16).view(np.uint8).reshape(2, -1, 2)
    qw, sw, weight = _q6_k_packs(raw.reshape(2, -1), 2, k)
    y6 = qmatmul.int6_linear(x, qw, sw).double()
    assert torch.allclose(y6, xq.double() @ weight.T, rtol=1e-6)


def test_two_part_activations_give_the_float_product_within_a_512th_of_a_step(isa):
    # One-part activations are off by up to d / 2; the second part leaves d / 512.
    _, _, qs, sm = _weights(n=64, k=1024, g=32)
    w = torch.empty(64, 1024)
    qmatmul.int4_dequantize(qs, sm, 32, w)
    x = torch.randn(6, 1024) * torch.rand(1, 1024) * 4  # uneven block scales
    exact = x.double() @ w.double().T
    previous = qmatmul.set_two_part_activations(False)
    try:
        coarse = (qmatmul.int4_linear(x, qs, sm, 32).double() - exact).abs().max()
    finally:
        qmatmul.set_two_part_activations(previous)
    fine = (qmatmul.int4_linear(x, qs, sm, 32).double() - exact).abs().max()
    assert fine < coarse / 100


def test_int6_dequantize_gives_the_weights_the_blocks_stand_for():
    qw, sw, weight = _q6_k_packs(_q6_k_raw(9, 512), 9, 512)
    out = torch.empty(9, 512)
    qmatmul.int6_dequantize(qw, sw, out)
    assert torch.equal(out.double(), weight)


def test_int6_linear_rejects_inputs_that_are_not_whole_blocks_of_256():
    qw, sw, _ = _q6_k_packs(_q6_k_raw(8, 256), 8, 256)
    with pytest.raises(RuntimeError, match="K must be a multiple of 256, got 128"):
        qmatmul.int6_linear(torch.randn(1, 128), qw, sw)
    with pytest.raises(RuntimeError, match=r"qw must be \[N, K/256\*192\]"):
        qmatmul.int6_linear(torch.randn(1, 512), qw, sw)


def test_prefill_gemms_give_the_same_floats_on_avx512_vnni_as_on_avx2():
    if "avx512-vnni" not in qmatmul.available_kernel_isas():
        pytest.skip("this CPU cannot run the avx512-vnni kernels")
    torch.manual_seed(3)
    # N: 2 wide tiles and a tail of 5 columns; M: 4-row tiles and 3 last rows.
    n, m, k = 69, 11, 512
    q4, sz = quantize_int4(torch.randn(n, k) * 0.05, 64)
    qs, sm = qmatmul.pack_int4(q4, sz)
    q5, d5 = _q5_weights(n, k)
    q6, c6, d6 = _q6_weights(n, k)
    x = torch.randn(m, k)
    products = {
        "int4": lambda: qmatmul.int4_gemm(x, qs, sm, 64),
        "5-bit": lambda: qmatmul.int8_gemm(x, q5, d5),
        "6-bit": lambda: qmatmul.int6_gemm(x, q6, c6, d6),
    }
    outputs: dict[str, dict[str, torch.Tensor]] = {}
    previous = qmatmul.kernel_isa()
    try:
        for isa in ("avx2", "avx512-vnni"):
            qmatmul.set_kernel_isa(isa)
            outputs[isa] = {name: product() for name, product in products.items()}
    finally:
        qmatmul.set_kernel_isa(previous)
    for name in products:
        assert torch.equal(outputs["avx2"][name], outputs["avx512-vnni"][name]), name
