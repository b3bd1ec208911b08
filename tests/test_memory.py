"""Memory handed back while loading: pages of a mapped checkpoint tensor, freed heap."""

import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from generation.memory import release_mapped_pages
from tests.conftest import smaps_entry

if not sys.platform.startswith("linux"):
    pytest.skip("reads /proc/self/smaps (Linux only)", allow_module_level=True)


def _resident_kb(address: int) -> int:
    return int(smaps_entry(address, "Rss:")[0])


@pytest.fixture
def mapped(tmp_path):
    """A 16 MiB float tensor read through a mapping of a .safetensors file, every page touched."""
    path = tmp_path / "weights.safetensors"
    torch.manual_seed(0)
    save_file({"w": torch.randn(2048, 2048)}, str(path))
    with safe_open(str(path), framework="pt") as f:  # the default backend maps the file
        tensor = f.get_tensor("w")
    expected = tensor.clone()
    assert tensor.sum().isfinite()  # touch every page
    return tensor, expected


def test_released_pages_of_a_mapped_checkpoint_tensor_leave_memory(mapped):
    tensor, _ = mapped
    before = _resident_kb(tensor.data_ptr())
    assert before >= 16 * 1024
    released = release_mapped_pages(tensor)
    assert released >= 16 * 1024 * 1024 - 2 * 4096  # all but the pages it shares at its ends
    assert _resident_kb(tensor.data_ptr()) <= before - released // 1024


def test_a_released_tensor_still_reads_its_values_from_the_file(mapped):
    tensor, expected = mapped
    release_mapped_pages(tensor)
    assert torch.equal(tensor, expected)


def test_tensors_not_mapped_from_a_checkpoint_are_left_alone():
    heap = torch.arange(4 << 20, dtype=torch.float32)
    assert release_mapped_pages(heap) == 0
    assert torch.equal(heap, torch.arange(4 << 20, dtype=torch.float32))
    assert release_mapped_pages(torch.empty(0)) == 0
