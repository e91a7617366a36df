"""A LLaMA-style causal LM built from a :class:`~swarm.config.ModelConfig`, and its pipeline stages.

The model is assembled from ``transformers``' Llama building blocks (never from hub weights) and cut into
contiguous pipeline stages with :func:`~swarm.config.stage_layer_ranges`:

* stage 0 owns the token embedding,
* every stage owns its slice of decoder layers and a (parameter-free) rotary embedding,
* the last stage owns the final RMSNorm and the LM head.

A :class:`StageModule` builds only its own parts and names its parameters exactly as the whole
``LlamaForCausalLM`` does (``model.embed_tokens.weight``, ``model.layers.3.mlp.up_proj.weight``,
``lm_head.weight``, ...). Every parameter is initialised from its own generator, seeded from the config seed
and that name, so any peer building any stage gets bit-identical weights to the corresponding parameters of
:func:`build_model` without ever materialising the rest of the model.

Attention uses SDPA with no mask, i.e. ``is_causal=True``; positions are always ``arange(T)``.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

from swarm.config import ModelConfig, head_cost_in_layers, stage_layer_ranges

logger = logging.getLogger(__name__)

__all__ = [
    "llama_config",
    "build_model",
    "init_weights",
    "parameter_seed",
    "StageModule",
    "causal_lm_loss",
    "input_spec",
    "output_spec",
    "hidden_spec",
    "count_parameters",
]

Spec = Tuple[Tuple[int, ...], torch.dtype]


def llama_config(cfg: ModelConfig) -> LlamaConfig:
    """Translate a :class:`ModelConfig` into a ``transformers.LlamaConfig``.

    Untied embeddings, no biases, no KV cache, no padding index, SDPA attention.
    """
    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        # transformers 5 defaults head_dim independently of hidden_size, so pin it
        head_dim=cfg.hidden_size // cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.rms_norm_eps,
        initializer_range=cfg.init_std,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        use_cache=False,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
        attn_implementation="sdpa",
    )


def parameter_seed(seed: int, name: str) -> int:
    """The generator seed of the parameter called ``name`` (whole-model naming) under config seed ``seed``.

    Uses blake2b rather than ``hash()`` so that it is stable across processes and machines.
    """
    digest = hashlib.blake2b(f"{int(seed)}:{name}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _fill_(param: Tensor, cfg: ModelConfig, name: str, kind: str) -> None:
    with torch.no_grad():
        if kind == "normal":
            # Sample on CPU in float32 so that the values do not depend on the target device or dtype.
            gen = torch.Generator(device="cpu")
            gen.manual_seed(parameter_seed(cfg.seed, name))
            values = torch.empty(param.shape, dtype=torch.float32).normal_(0.0, cfg.init_std, generator=gen)
            param.copy_(values)
        elif kind == "ones":
            param.fill_(1.0)
        elif kind == "zeros":
            param.zero_()
        else:  # pragma: no cover - internal misuse
            raise ValueError(f"unknown init kind {kind!r}")


def init_weights(module: nn.Module, cfg: ModelConfig, prefix: str = "") -> None:
    """Deterministically (re)initialise every parameter of ``module`` in place.

    Each parameter gets its own CPU ``torch.Generator`` seeded from ``(cfg.seed, prefix + local_name)``, where
    ``prefix + local_name`` must be the parameter's name in the whole model (e.g.
    ``"model.layers.3.mlp.up_proj.weight"``). Linear and Embedding weights are drawn from
    ``normal(0, cfg.init_std)``, RMSNorm weights are ones, biases (none by default) zeros. Raises
    ``TypeError`` if a parameter belongs to a module kind this scheme does not know.
    """
    seen = set()
    for mod_name, mod in module.named_modules():
        base = prefix + (mod_name + "." if mod_name else "")
        if isinstance(mod, (nn.Linear, nn.Embedding)):
            kinds = {"weight": "normal", "bias": "zeros"}
        elif isinstance(mod, LlamaRMSNorm) or type(mod).__name__.endswith("RMSNorm"):
            kinds = {"weight": "ones"}
        else:
            kinds = {}
        for pname, param in mod.named_parameters(recurse=False):
            if pname not in kinds:
                raise TypeError(
                    f"init_weights does not know how to initialise {base + pname} ({type(mod).__name__})"
                )
            _fill_(param, cfg, base + pname, kinds[pname])
            seen.add(id(param))
    missing = [n for n, p in module.named_parameters() if id(p) not in seen]
    if missing:  # pragma: no cover - every parameter is owned by some module
        raise TypeError(f"init_weights left parameters uninitialised: {missing}")


def build_model(cfg: ModelConfig) -> LlamaForCausalLM:
    """Build the whole causal LM, initialised by :func:`init_weights` (the reference for all stages)."""
    model = LlamaForCausalLM(llama_config(cfg))
    init_weights(model, cfg)
    logger.debug("built whole model: %d parameters", count_parameters(model))
    return model


class _Float32RotaryEmbedding(LlamaRotaryEmbedding):
    """Llama rotary embedding whose inverse frequencies stay float32 when the module is cast.

    ``stage.to(torch.bfloat16)`` would otherwise round ``inv_freq`` to bf16, which puts radians of error into
    the rotation angles at positions in the hundreds.
    """

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__(config=config)
        self._inv_freq_fp32 = self.inv_freq.detach().to(torch.float32).clone()

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        for buf in ("inv_freq", "original_inv_freq"):
            current = getattr(self, buf, None)
            if isinstance(current, Tensor) and buf in self._buffers and current.dtype != torch.float32:
                self._buffers[buf] = self._inv_freq_fp32.to(current.device)
        return self


class _StageBody(nn.Module):
    """Holder that reproduces ``LlamaModel``'s attribute names (``embed_tokens``, ``layers``, ``norm``)."""


class StageModule(nn.Module):
    """One pipeline stage of the model described by ``cfg``, cut into ``num_stages`` stages.

    Builds only its own parts; its parameter names equal the whole model's (the decoder layers live in a
    ``ModuleDict`` keyed by their global index), so ``stage.state_dict()`` is a subset of
    ``build_model(cfg).state_dict()`` with identical values.

    ``forward`` takes int64 input ids ``[B, T]`` on the first stage and hidden states ``[B, T, H]`` otherwise;
    it returns hidden states ``[B, T, H]``, or logits ``[B, T, V]`` on the last stage.
    Pass ``device`` to allocate the weights directly there (e.g. a GPU) instead of on the CPU.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        stage: int,
        num_stages: int,
        *,
        device: Optional[Union[str, torch.device]] = None,
    ) -> None:
        super().__init__()
        ranges = stage_layer_ranges(cfg.num_layers, num_stages, head_cost_in_layers(cfg))
        _check_stage(stage, num_stages)
        self.cfg = cfg
        self.stage = int(stage)
        self.num_stages = int(num_stages)
        self.is_first = self.stage == 0
        self.is_last = self.stage == self.num_stages - 1
        self.layer_range: Tuple[int, int] = ranges[self.stage]
        self.llama_config = llama_config(cfg)
        target = torch.device(device) if device is not None else torch.device("cpu")

        # Create the weight-bearing parts on the meta device and allocate them once, uninitialised:
        # the default (Kaiming) init would be wasted work, since init_weights overwrites everything.
        self.model = _StageBody()
        with torch.device("meta"):
            if self.is_first:
                self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
            self.model.layers = nn.ModuleDict(
                {str(i): LlamaDecoderLayer(self.llama_config, layer_idx=i) for i in range(*self.layer_range)}
            )
            if self.is_last:
                self.model.norm = LlamaRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
                self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.to_empty(device=target)
        init_weights(self, cfg)
        # Built after to_empty: its buffers are computed, not initialised, so they must not be emptied.
        self.model.rotary_emb = _Float32RotaryEmbedding(self.llama_config).to(target)
        logger.debug(
            "built stage %d/%d: layers [%d, %d), %d parameters",
            self.stage,
            self.num_stages,
            *self.layer_range,
            count_parameters(self),
        )

    def forward(self, inputs: Tensor) -> Tensor:
        """Run this stage: ids ``[B, T]`` or hidden ``[B, T, H]`` in, hidden ``[B, T, H]`` or logits out."""
        if self.is_first:
            if inputs.dim() != 2 or inputs.is_floating_point():
                raise ValueError(
                    f"stage 0 expects integer input ids [B, T], got {tuple(inputs.shape)} {inputs.dtype}"
                )
            hidden = self.model.embed_tokens(inputs)
        else:
            if inputs.dim() != 3 or inputs.shape[-1] != self.cfg.hidden_size:
                raise ValueError(
                    f"stage {self.stage} expects hidden states [B, T, {self.cfg.hidden_size}], got {tuple(inputs.shape)}"
                )
            hidden = inputs
        seq_len = hidden.shape[1]
        position_ids = torch.arange(seq_len, device=hidden.device).unsqueeze(0)
        position_embeddings = self.model.rotary_emb(hidden, position_ids)
        for layer in self.model.layers.values():
            # No mask: SDPA then runs with is_causal=True.
            out = layer(
                hidden,
                attention_mask=None,
                position_ids=position_ids,
                position_embeddings=position_embeddings,
            )
            # transformers < 5 returns a tuple from decoder layers, >= 5 a tensor
            hidden = out[0] if isinstance(out, tuple) else out
        if self.is_last:
            hidden = self.lm_head(self.model.norm(hidden))
        return hidden

    def extra_repr(self) -> str:
        return f"stage={self.stage}, num_stages={self.num_stages}, layers={self.layer_range}"


def causal_lm_loss(logits: Tensor, input_ids: Tensor) -> Tensor:
    """Mean next-token cross-entropy: ``logits[:, :-1]`` predicts ``input_ids[:, 1:]``; float32 result.

    Targets equal to -100 are ignored, as in ``transformers``.
    """
    vocab = logits.shape[-1]
    shifted = logits[:, :-1, :].reshape(-1, vocab).float()
    targets = input_ids[:, 1:].reshape(-1).to(device=logits.device, dtype=torch.long)
    return F.cross_entropy(shifted, targets, ignore_index=-100)


def hidden_spec(cfg: ModelConfig, batch: int, seq_len: int, dtype: torch.dtype = torch.float32) -> Spec:
    """Shape and dtype of the hidden states passed between stages."""
    return (int(batch), int(seq_len), cfg.hidden_size), dtype


def _check_stage(stage: int, num_stages: int) -> None:
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage must be in [0, {num_stages}), got {stage}")


def input_spec(
    cfg: ModelConfig,
    stage: int,
    num_stages: int,
    batch: int,
    seq_len: int,
    *,
    dtype: torch.dtype = torch.float32,
) -> Spec:
    """Shape and dtype of what ``stage`` receives: int64 ids ``[B, T]`` on stage 0, else hidden ``[B, T, H]``.

    ``dtype`` is the floating dtype of hidden states (float32 unless the pipeline sends another).
    """
    _check_stage(stage, num_stages)
    if stage == 0:
        return (int(batch), int(seq_len)), torch.int64
    return hidden_spec(cfg, batch, seq_len, dtype)


def output_spec(
    cfg: ModelConfig,
    stage: int,
    num_stages: int,
    batch: int,
    seq_len: int,
    *,
    dtype: torch.dtype = torch.float32,
) -> Spec:
    """Shape and dtype of what ``stage`` sends: logits ``[B, T, V]`` from the last stage, else hidden ``[B, T, H]``."""
    _check_stage(stage, num_stages)
    if stage == num_stages - 1:
        return (int(batch), int(seq_len), cfg.vocab_size), dtype
    return hidden_spec(cfg, batch, seq_len, dtype)


def count_parameters(module: nn.Module) -> int:
    """Number of scalar parameters in ``module`` (shared parameters counted once)."""
    return sum(p.numel() for p in module.parameters())
