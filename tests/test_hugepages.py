"""Quantized packs moved onto a mapping advised for huge pages: same outputs, one arena."""

import pytest
import torch
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from generation import hugepages, qmatmul
from generation.provision import pull_preset
from generation.quant import QuantizedLinear
from generation.quant_load import quantize_model
from tests.conftest import MODEL_DIR, TINY_SIZES, smaps_entry

if not hugepages.available():
    pytest.skip("this kernel offers no transparent huge pages", allow_module_level=True)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(pull_preset("smollm2-135m-instruct", MODEL_DIR).path)


def _model(tokenizer, mode: str) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), **TINY_SIZES)).eval()
    quantize_model(model, mode, group_size=32)
    return model


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_packs_move_to_one_advised_arena_and_outputs_stay_the_same(tokenizer, mode):
    if not qmatmul.load():
        pytest.skip("ragqa's kernels did not build here")
    model = _model(tokenizer, mode)
    ids = torch.tensor([tokenizer.encode("Copper wires carry current")])
    with torch.inference_mode():
        before = model(ids).logits
        step_before = model(ids[:, :1]).logits  # one row: the decode kernels
    moved = hugepages.move_packs(model)
    linears = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert moved >= sum(m.qweight.nbytes + m.scales.nbytes for m in linears)
    storages = {m.qweight.untyped_storage().data_ptr() for m in linears}
    storages |= {m.scales.untyped_storage().data_ptr() for m in linears}
    assert len(storages) == 1  # every pack, stacked groups' members included
    assert "hg" in smaps_entry(next(iter(storages)), "VmFlags:")  # MADV_HUGEPAGE
    group = linears[0].siblings
    assert group is not None and linears[0].qweight.data_ptr() == group.qweight.data_ptr()
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, before)
        assert torch.equal(model(ids[:, :1]).logits, step_before)


def test_nothing_moves_where_huge_pages_are_off(tokenizer, monkeypatch):
    model = _model(tokenizer, "int8")
    monkeypatch.setattr(hugepages, "available", lambda: False)
    first = next(m for m in model.modules() if isinstance(m, QuantizedLinear))
    pointer = first.qweight.data_ptr()
    assert hugepages.move_packs(model) == 0
    assert first.qweight.data_ptr() == pointer
