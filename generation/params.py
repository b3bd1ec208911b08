"""`GenerationParams`: the validated sampling parameters of one request.

Normalised at construction (temperature 0 means greedy; greedy ignores top-k/top-p) and
every bad value raises naming the parameter, the allowed range and the value. The HTTP
layer converts its own request types into this; the engine never sees HTTP types.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class ParamError(ValueError):
    pass


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = field(default_factory=tuple)
    seed: int | None = None
    ignore_eos: bool = False  # keep going past EOS (benchmarks want a fixed length)

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or not 1 <= self.max_new_tokens <= 32768:
            raise ParamError(f"max_new_tokens must be in [1, 32768], got {self.max_new_tokens}")
        if not 0.0 <= self.temperature <= 5.0:
            raise ParamError(f"temperature must be in [0, 5], got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ParamError(f"top_k must be an integer >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ParamError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise ParamError(
                f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}"
            )
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if len(stop) > 8:
            raise ParamError(f"stop must have at most 8 strings, got {len(stop)}")
        if any(not isinstance(s, str) or not s for s in stop):
            raise ParamError("stop strings must be non-empty strings")
        object.__setattr__(self, "stop", stop)
        if self.temperature == 0.0:
            # Greedy decoding: filters change nothing, so drop them for a cheaper step.
            object.__setattr__(self, "top_k", 0)
            object.__setattr__(self, "top_p", 1.0)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
