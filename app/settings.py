"""The one Settings object: every knob of the service, read from RAGQA_* variables and .env.

Only `app/` builds it. Packages below `app/` receive the plain values they need as
constructor arguments and never read the environment themselves.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_GENERATOR = "qwen2.5-coder-1.5b-instruct"
DEFAULT_EMBEDDER = "all-minilm-l6-v2"


class ApiKeys:
    """Parsed `RAGQA_API_KEYS`: plain keys and admin keys (written `admin:<key>`)."""

    def __init__(self, raw: str) -> None:
        self.user: list[str] = []
        self.admin: list[str] = []
        for item in raw.split(","):
            key = item.strip()
            if not key:
                continue
            if key.startswith("admin:"):
                secret = key.removeprefix("admin:").strip()
                if not secret:
                    raise ValueError("RAGQA_API_KEYS has an empty admin key ('admin:')")
                self.admin.append(secret)
            else:
                self.user.append(key)

    @property
    def enabled(self) -> bool:
        return bool(self.user or self.admin)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="RAGQA_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    data_dir: Path = Field(Path("./data"), description="Uploads, FAISS index and SQLite file.")
    database_url: str = Field(
        "", description="SQLAlchemy URL; empty means SQLite at DATA_DIR/ragqa.db."
    )
    model_dir: Path = Field(
        Path("~/.cache/ragqa/models"), description="Cache of assembled and converted models."
    )
    generator: str = Field(
        DEFAULT_GENERATOR, description="Generator preset name or path to a transformers folder."
    )
    embedder: str = Field(DEFAULT_EMBEDDER, description="Embedder preset name or local folder.")
    hub_models: bool = Field(
        False, description="Allow non-preset names to be fetched from a model hub."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the generator runs.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Generator dtype; auto picks bf16 where it is fast."
    )
    quantization: Literal["auto", "none", "int8", "int4", "gguf"] = Field(
        "auto",
        description="Weight-only quantization of the generator on CPU; gguf takes the 4-bit "
        "blocks of the GGUF the model was converted from as they are and int8 elsewhere; "
        "auto is gguf where ragqa's CPU kernels build and that GGUF is at hand, int8 where "
        "it is not, none without the kernels (GPUs included).",
    )
    quant_group_size: int = Field(
        64, ge=16, le=1024, description="int4 group size (gguf's 4-bit blocks are 32)."
    )
    prefill_weights: Literal["auto", "float", "quantized", "integer"] = Field(
        "auto",
        description="Weights a quantized generator prefills with: float copies (the 1.5B "
        "int8 peaks at 10.9 GB), its quantized ones expanded per layer (2-12% slower "
        "prefill, 4.3 GB), integer: int4 packs times int8 activations on ragqa's GEMM (no "
        "float copy of them; int8 packs keep theirs), or auto: float where the copies take "
        "at most half of the memory available before loading.",
    )
    host: str = Field("127.0.0.1", description="Address the API binds to.")
    port: int = Field(8000, ge=1, le=65535, description="Port the API binds to.")
    max_upload_mb: int = Field(100, ge=1, le=100_000, description="Largest upload accepted (MB).")
    api_keys: str = Field(
        "", description="Comma-separated keys; 'admin:' prefix marks an admin key."
    )
    allow_insecure: bool = Field(False, description="Allow a non-loopback bind without API keys.")
    index_type: Literal["flat", "hnsw", "ivf"] = Field("flat", description="FAISS index kind.")
    chunk_tokens: int = Field(256, ge=32, le=2048, description="Target chunk size in tokens.")
    chunk_overlap: int = Field(32, ge=0, le=512, description="Overlap between chunks (tokens).")
    worker: bool = Field(True, description="Run the ingestion worker inside `ragqa serve`.")
    job_max_attempts: int = Field(3, ge=1, le=20, description="Tries before a job fails.")
    job_lease_s: float = Field(60.0, gt=0, description="Lease a worker holds on a job (s).")
    top_k: int = Field(5, ge=1, le=50, description="Passages given to the generator.")
    # 20 rather than the usual 60: on SciFact, CMRC and SQuAD2 (bench/eval_*.py) it ranked
    # better or equal everywhere (README, "Measured results").
    rrf_k: int = Field(20, ge=1, le=1000, description="Reciprocal rank fusion constant.")
    refusal_threshold: float = Field(
        0.30, ge=-1.0, le=1.0, description="Refuse when the best cosine is below this."
    )
    # None: the generator preset's own measured value (generation/presets.py: 0.65 for the
    # 1.5B default, off for models it was not measured on).
    answerable_threshold: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description=(
            "Refuse when the model's P(passages answer it) is below this; 0 = off; "
            "unset = the generator preset's measured value."
        ),
    )
    max_question_chars: int = Field(2000, ge=10, le=100_000, description="Longest question.")
    max_answer_tokens: int = Field(256, ge=16, le=4096, description="Default answer length.")
    max_context_tokens: int = Field(
        4096, ge=512, le=131_072, description="Prompt + answer token budget for the generator."
    )
    max_batch: int = Field(8, ge=1, le=256, description="Requests decoded together.")
    prefix_cache: int = Field(8, ge=0, le=1024, description="Cached prompt prefixes (LRU).")
    reranker: str = Field("", description="Local cross-encoder folder; empty: no reranking.")
    load_generator: bool = Field(True, description="Load the generator at start-up.")
    log_level: str = Field("INFO", description="Python logging level.")

    @field_validator("api_keys")
    @classmethod
    def _check_keys(cls, value: str) -> str:
        ApiKeys(value)  # raises with the reason when malformed
        return value

    @field_validator("chunk_overlap")
    @classmethod
    def _overlap_below_size(cls, value: int, info: object) -> int:
        size = getattr(info, "data", {}).get("chunk_tokens", 256)
        if value >= size:
            raise ValueError(f"chunk_overlap must be < chunk_tokens ({size}), got {value}")
        return value

    @property
    def keys(self) -> ApiKeys:
        return ApiKeys(self.api_keys)

    @property
    def resolved_data_dir(self) -> Path:
        return self.data_dir.expanduser().resolve()

    @property
    def resolved_model_dir(self) -> Path:
        return self.model_dir.expanduser().resolve()

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.resolved_data_dir / 'ragqa.db'}"

    @property
    def max_upload_bytes(self) -> int:
        return self.max_upload_mb * 1024 * 1024

    def bind_is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def check_bind_allowed(self) -> None:
        """Refuse to expose an unauthenticated server beyond this machine."""
        if self.keys.enabled or self.allow_insecure or self.bind_is_loopback():
            return
        raise ValueError(
            f"refusing to bind to {self.host} without API keys: set RAGQA_API_KEYS, "
            "bind to 127.0.0.1, or set RAGQA_ALLOW_INSECURE=1"
        )
