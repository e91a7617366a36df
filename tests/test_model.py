"""Tests for swarm.model: stages chained by hand match the whole model in loss, gradients and weights."""

from __future__ import annotations

import pytest
import torch

from swarm.config import ModelConfig, head_cost_in_layers, stage_layer_ranges
from swarm.model import (
    StageModule,
    build_model,
    causal_lm_loss,
    count_parameters,
    init_weights,
    input_spec,
    llama_config,
    output_spec,
    parameter_seed,
)

TINY = dict(vocab_size=256, hidden_size=64, num_layers=4, num_heads=2, num_kv_heads=2, intermediate_size=128)


@pytest.fixture(scope="module")
def cfg() -> ModelConfig:
    return ModelConfig(**TINY, seed=7)


def _batch(cfg: ModelConfig, batch: int = 3, seq_len: int = 12, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=gen)


def _pipeline_step(stages, input_ids):
    """Forward through the stages, then backward stage by stage as a pipeline would; returns the loss."""
    inputs, outputs = [], []
    x = input_ids
    for stage in stages:
        if not stage.is_first:
            x = x.detach().requires_grad_(True)
        inputs.append(x)
        x = stage(x)
        outputs.append(x)
    loss = causal_lm_loss(outputs[-1], input_ids)
    loss.backward()
    for i in range(len(stages) - 2, -1, -1):
        outputs[i].backward(inputs[i + 1].grad)
    return loss


@pytest.mark.parametrize("num_stages", [1, 2, 3, 4])
def test_stages_match_whole_model_loss_and_grads(cfg, num_stages):
    input_ids = _batch(cfg)
    whole = build_model(cfg)
    ref = whole(input_ids=input_ids, labels=input_ids)
    ref.loss.backward()
    ref_grads = {name: p.grad for name, p in whole.named_parameters()}

    stages = [StageModule(cfg, s, num_stages) for s in range(num_stages)]
    loss = _pipeline_step(stages, input_ids)

    assert loss.dtype == torch.float32
    assert torch.allclose(loss, ref.loss, atol=1e-5, rtol=0), (loss.item(), ref.loss.item())
    seen = set()
    for stage in stages:
        for name, p in stage.named_parameters():
            assert name in ref_grads, name
            assert name not in seen, f"{name} owned by two stages"
            seen.add(name)
            assert p.grad is not None, name
            assert torch.allclose(p.grad, ref_grads[name], atol=1e-5, rtol=1e-4), name
    assert seen == set(ref_grads), set(ref_grads) ^ seen


@pytest.mark.parametrize("num_stages", [1, 3])
def test_stage_weights_equal_whole_model(cfg, num_stages):
    whole = build_model(cfg).state_dict()
    for s in range(num_stages):
        for name, tensor in StageModule(cfg, s, num_stages).state_dict().items():
            assert torch.equal(tensor, whole[name]), name


def test_stage_parts(cfg):
    stages = [StageModule(cfg, s, 3) for s in range(3)]
    assert [s.layer_range for s in stages] == stage_layer_ranges(cfg.num_layers, 3, head_cost_in_layers(cfg))
    assert [(s.is_first, s.is_last) for s in stages] == [(True, False), (False, False), (False, True)]
    assert hasattr(stages[0].model, "embed_tokens") and not hasattr(stages[1].model, "embed_tokens")
    assert hasattr(stages[2], "lm_head") and not hasattr(stages[0], "lm_head")
    for s in stages:
        assert sorted(int(k) for k in s.model.layers) == list(range(*s.layer_range))
    assert sum(count_parameters(s) for s in stages) == count_parameters(build_model(cfg))
    with pytest.raises(ValueError):
        StageModule(cfg, 3, 3)


def test_causality(cfg):
    model = StageModule(cfg, 0, 1).eval()
    input_ids = _batch(cfg, batch=2, seq_len=16)
    with torch.no_grad():
        base = model(input_ids)
        for t in (1, 7, 15):
            changed = input_ids.clone()
            changed[:, t] = (changed[:, t] + 1) % cfg.vocab_size
            out = model(changed)
            assert torch.equal(out[:, :t], base[:, :t]), t
            assert not torch.allclose(out[:, t:], base[:, t:]), t


def test_same_stage_identical_and_seed_matters(cfg):
    a, b = StageModule(cfg, 1, 2), StageModule(cfg, 1, 2)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert na == nb and torch.equal(pa, pb), na
    other = StageModule(ModelConfig(**TINY, seed=8), 1, 2)
    name = "model.layers.3.mlp.up_proj.weight"
    assert not torch.equal(dict(a.named_parameters())[name], dict(other.named_parameters())[name])
    # distinct parameters get distinct streams
    assert not torch.equal(
        dict(a.named_parameters())["model.layers.3.mlp.up_proj.weight"],
        dict(a.named_parameters())["model.layers.2.mlp.up_proj.weight"],
    )
    assert parameter_seed(0, "x") == parameter_seed(0, "x") != parameter_seed(1, "x")


def test_init_weights_values(cfg):
    stage = StageModule(cfg, 0, 1)
    params = dict(stage.named_parameters())
    assert torch.equal(params["model.norm.weight"], torch.ones(cfg.hidden_size))
    w = params["lm_head.weight"]
    assert abs(w.std().item() - cfg.init_std) < 0.1 * cfg.init_std and abs(w.mean().item()) < 1e-3
    # prefix maps a sub-module's local names to whole-model names
    layer = stage.model.layers["2"]
    with torch.no_grad():
        for p in layer.parameters():
            p.zero_()
    init_weights(layer, cfg, prefix="model.layers.2.")
    whole = build_model(cfg).state_dict()
    for name, p in layer.named_parameters():
        assert torch.equal(p, whole["model.layers.2." + name]), name


def test_default_config_size():
    cfg = ModelConfig()
    total = sum(count_parameters(StageModule(cfg, s, 2)) for s in range(2))
    assert 1_000_000 < total < 10_000_000
    assert total == count_parameters(build_model(cfg))


def test_llama_config(cfg):
    lc = llama_config(cfg)
    assert lc.tie_word_embeddings is False and lc.use_cache is False
    assert lc.attention_bias is False and lc.mlp_bias is False
    assert lc.head_dim == cfg.hidden_size // cfg.num_heads
    model = build_model(cfg)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


def test_stage_layer_ranges_edges():
    assert stage_layer_ranges(4, 1) == [(0, 4)]
    assert stage_layer_ranges(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    ranges = stage_layer_ranges(7, 3)
    assert ranges[0][0] == 0 and ranges[-1][1] == 7
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    assert (
        stage_layer_ranges(7, 3) == [(0, 2), (2, 5), (5, 7)]
        or max(b - a for a, b in stage_layer_ranges(7, 3)) == 3
    )
    # an expensive head moves blocks away from the last stage, never below one block per stage
    assert stage_layer_ranges(4, 2, head_cost=1.6) == [(0, 3), (3, 4)]
    assert stage_layer_ranges(4, 2, head_cost=0.0) == [(0, 2), (2, 4)]
    assert stage_layer_ranges(4, 4, head_cost=10.0) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert stage_layer_ranges(16, 4, head_cost=1.1)[-1] == (13, 16)
    with pytest.raises(ValueError):
        stage_layer_ranges(3, 4)
    with pytest.raises(ValueError):
        stage_layer_ranges(4, 0)
    with pytest.raises(ValueError):
        StageModule(ModelConfig(**TINY), 0, 5)


@pytest.mark.parametrize("num_stages", [1, 2, 3])
def test_specs_match_tensors(cfg, num_stages):
    batch, seq_len = 2, 9
    x = _batch(cfg, batch=batch, seq_len=seq_len)
    for s in range(num_stages):
        stage = StageModule(cfg, s, num_stages)
        assert (tuple(x.shape), x.dtype) == input_spec(cfg, s, num_stages, batch, seq_len)
        with torch.no_grad():
            x = stage(x)
        assert (tuple(x.shape), x.dtype) == output_spec(cfg, s, num_stages, batch, seq_len)
    assert x.shape[-1] == cfg.vocab_size


def test_bf16_cast_and_autocast(cfg):
    stages = [StageModule(cfg, s, 2) for s in range(2)]
    input_ids = _batch(cfg)
    with torch.no_grad():
        ref = stages[1](stages[0](input_ids))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = stages[0](input_ids)
            logits = stages[1](hidden)
    assert hidden.dtype == torch.float32  # residual stream stays float32 under autocast
    loss = causal_lm_loss(logits, input_ids)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert abs(loss.item() - causal_lm_loss(ref, input_ids).item()) < 0.05
    casted = StageModule(cfg, 0, 1).to(dtype=torch.bfloat16)
    assert casted.model.rotary_emb.inv_freq.dtype == torch.float32
    assert casted.lm_head.weight.dtype == torch.bfloat16
    with torch.no_grad():
        out = casted(input_ids)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
