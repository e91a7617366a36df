"""Validated dataclass configs, one per component; units in names (``*_s`` seconds, ``num_*`` counts)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass(kw_only=True)
class ModelConfig:
    """A LLaMA-style causal LM, built from this config with ``transformers`` (never from hub weights)."""

    vocab_size: int = 4096
    hidden_size: int = 192
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 512
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    init_std: float = 0.02
    seed: int = 0  # every replica of a stage initialises identically from this seed

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "intermediate_size",
        ):
            _check(int(getattr(self, name)) >= 1, f"model.{name} must be >= 1")
        _check(
            self.hidden_size % self.num_heads == 0, "model.hidden_size must be divisible by model.num_heads"
        )
        _check(
            self.num_heads % self.num_kv_heads == 0, "model.num_heads must be divisible by model.num_kv_heads"
        )
        _check(self.max_position_embeddings >= 8, "model.max_position_embeddings must be >= 8")
        _check(math.isfinite(self.init_std) and self.init_std > 0, "model.init_std must be positive")


# Named model sizes. "tiny" trains on 2 CPU cores; "llama-1b" is the same code at a GPU-box size.
MODEL_PRESETS: Dict[str, Dict[str, Any]] = {
    "tiny": {},
    "small": dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=8, intermediate_size=1376),
    "llama-1b": dict(
        vocab_size=32000,
        hidden_size=2048,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        intermediate_size=8192,
        max_position_embeddings=2048,
        rope_theta=500000.0,
    ),
}


def model_preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {sorted(MODEL_PRESETS)}")
    return ModelConfig(**{**MODEL_PRESETS[name], **overrides})


@dataclass(kw_only=True)
class DataConfig:
    """Where the training text comes from and how it is cut into micro-batches."""

    paths: List[str] = field(
        default_factory=list
    )  # local .txt/.jsonl/.json/.parquet; empty: the shipped corpus
    text_field: str = "text"  # the column holding text in jsonl/parquet files
    tokenizer: Optional[str] = None  # a local tokenizer dir or tokenizer.json; None: the shipped tokenizer
    seq_len: int = 128
    microbatch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        _check(2 <= self.seq_len <= 65536, "data.seq_len must be in [2, 65536]")
        _check(1 <= self.microbatch_size <= 4096, "data.microbatch_size must be in [1, 4096]")


def stage_layer_ranges(num_layers: int, num_stages: int, head_cost: float = 0.0) -> List[Tuple[int, int]]:
    """Cut ``num_layers`` blocks into ``num_stages`` contiguous [start, end) ranges with the least costly stage
    as cheap as possible (a pipeline runs at the pace of its slowest stage).

    Each block costs 1; the last stage also pays ``head_cost`` (the LM head and loss, in units of one block).
    Ties go to the cut with more even block counts.
    """
    _check(num_stages >= 1, "num_stages must be >= 1")
    _check(num_layers >= num_stages, f"cannot cut {num_layers} layers into {num_stages} stages")
    _check(math.isfinite(head_cost) and head_cost >= 0, "head_cost must be finite and >= 0")
    inf = (float("inf"), float("inf"))
    # best[s][n]: (max stage cost, sum of squared block counts) of cutting the first n blocks into s stages
    best = [[inf] * (num_layers + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (num_layers + 1) for _ in range(num_stages + 1)]
    best[0][0] = (0.0, 0.0)
    for s in range(1, num_stages + 1):
        for n in range(s, num_layers - (num_stages - s) + 1):
            for k in range(s - 1, n):
                if best[s - 1][k] == inf:
                    continue
                size = n - k
                cost = size + (head_cost if s == num_stages else 0.0)
                candidate = (max(best[s - 1][k][0], cost), best[s - 1][k][1] + size * size)
                if candidate < best[s][n]:
                    best[s][n], cut[s][n] = candidate, k
    ranges, n = [], num_layers
    for s in range(num_stages, 0, -1):
        ranges.append((cut[s][n], n))
        n = cut[s][n]
    return ranges[::-1]


def head_cost_in_layers(cfg: ModelConfig, seq_len: int = 128) -> float:
    """The LM head plus loss, in units of one transformer block's compute (multiply-adds per token)."""
    h, kv = cfg.hidden_size, cfg.num_kv_heads * (cfg.hidden_size // cfg.num_heads)
    block = 2 * h * h + 2 * h * kv + 3 * h * cfg.intermediate_size + 2 * seq_len * h
    head = h * cfg.vocab_size + 4 * cfg.vocab_size  # matmul, then softmax/cross-entropy over the vocabulary
    return head / block


def to_dict(config: Any) -> Dict[str, Any]:
    return dataclasses.asdict(config)
