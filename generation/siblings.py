"""Projections that share an input (q/k/v, gate/up), stacked into one kernel call.

A decode step multiplies each of them by the same few rows; one call over their stacked
packs quantizes the activations once and starts the thread pool once. Long calls
(prefill) never go through the stack (`QuantizedLinear.forward` says why).
"""

from __future__ import annotations

import torch
from torch import nn

from generation import qmatmul
from generation.quant import QuantizedLinear


class SiblingGroup:
    """Projections that read the same input, computed by one kernel call on decode steps.

    A decoder layer calls q_proj, k_proj and v_proj on the same hidden states, and
    gate_proj and up_proj on the same input. Each separate call quantizes the activations
    again, starts the thread pool again and pays Python's per-module cost; on the 1.5B
    model that is 7 kernel calls per layer where 4 suffice. Here the members' packed
    weights are stacked into one matrix (rows are quantized independently, so stacking
    changes no value); the first member called with an input computes every member's
    output, and the others take their slice when they are called with that same tensor
    object. The group holds a reference to that input until every member has taken its
    part, so the identity check cannot be fooled by a freed and reused tensor. A member
    called with any other tensor computes afresh, so an unexpected call order is only
    slower, never wrong. Inputs are not modified in place between the sibling calls (the
    models' own forward reads them once each), which the identity check relies on.
    """

    def __init__(self, members: list[QuantizedLinear]) -> None:
        first = members[0]
        self.mode, self.group_size = first.mode, first.group_size
        self.in_features = first.in_features
        self.offsets: dict[int, tuple[int, int]] = {}
        start = 0
        for m in members:
            self.offsets[id(m)] = (start, start + m.out_features)
            start += m.out_features
        self.qweight = torch.cat([m.qweight for m in members])
        self.scales = torch.cat([m.scales for m in members])
        biases = [m.bias for m in members]
        given = [b for b in biases if b is not None]
        self.bias = (
            None
            if not given
            else torch.cat(
                [
                    b.detach() if b is not None else given[0].new_zeros(m.out_features)
                    for b, m in zip(biases, members, strict=True)
                ]
            )
        )
        self.members = members
        for m in members:
            m.siblings = self
        self.point_members()
        self.size = len(members)
        self._input: torch.Tensor | None = None
        self._output: torch.Tensor | None = None
        self._left = 0

    def point_members(self) -> None:
        """Give the members views into the stacked weights (again, once those have moved)."""
        for m in self.members:
            lo, hi = self.offsets[id(m)]
            m.qweight, m.scales = self.qweight[lo:hi], self.scales[lo:hi]

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> every member's output side by side, [rows, sum of the members' N]."""
        flat = x.reshape(-1, self.in_features)
        if self.mode == "int8":
            y = qmatmul.int8_linear(flat, self.qweight, self.scales)
        elif self.mode == "q6k":
            y = qmatmul.int6_linear(flat, self.qweight, self.scales)
        else:
            y = qmatmul.int4_linear(flat, self.qweight, self.scales, self.group_size)
        # The same arithmetic as an unfused member: cast, then add the bias.
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y

    def stacked(self, members: list[QuantizedLinear]) -> bool:
        """Whether `members` are exactly this group's, stacked in this order."""
        # `offsets` was filled member by member with adjacent ranges.
        return [id(m) for m in members] == list(self.offsets)

    def output(self, x: torch.Tensor, member: QuantizedLinear) -> torch.Tensor:
        """x [..., K] -> this member's part of the stacked output, [rows, member's N]."""
        if x is not self._input or self._left == 0:
            self._input, self._output, self._left = x, self.compute(x), self.size
        assert self._output is not None
        lo, hi = self.offsets[id(member)]
        part = self._output[:, lo:hi]
        self._left -= 1
        if self._left == 0:
            self._input = self._output = None
        return part


# Attribute names of projections that share their input, per module, in the Llama/Qwen2
# family of decoder layers (attention and MLP).
SIBLING_NAMES = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def fuse_siblings(model: nn.Module) -> int:
    """Group the kernel-backed projections that share an input; returns how many groups."""
    return sum(fuse_module(module) for module in model.modules())


def fuse_module(module: nn.Module) -> int:
    """Group `module`'s own sibling projections (`SIBLING_NAMES`); returns how many groups."""
    groups = 0
    for names in SIBLING_NAMES:
        members = [getattr(module, n, None) for n in names]
        if not all(
            isinstance(m, QuantizedLinear) and m.kernel and m.siblings is None for m in members
        ):
            continue
        first = members[0]
        if any(
            m.mode != first.mode
            or m.group_size != first.group_size
            or m.in_features != first.in_features
            for m in members
        ):
            continue
        SiblingGroup(members)  # type: ignore[arg-type]
        groups += 1
    return groups
