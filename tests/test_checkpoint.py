"""Stage checkpoints (swarm.checkpoint): round trip, damage and mismatch detection, atomic saves, scheduling."""

import os

import pytest
import torch

from swarm.checkpoint import (
    CheckpointError,
    StageCheckpointer,
    StageState,
    check_model_matches,
    check_stage_params,
    checkpoint_path,
    describe_checkpoints,
    load_stage_state,
    parse_every,
    save_stage_state,
)
from swarm.config import ModelConfig, to_dict
from swarm.model import StageModule

TINY = ModelConfig(
    vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=2, intermediate_size=32
)


def trained_state(stage=0, num_stages=2, steps=2, epoch=7):
    module = StageModule(TINY, stage, num_stages)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-2)
    for _ in range(steps):
        x = torch.randint(0, 64, (2, 8)) if stage == 0 else torch.randn(2, 8, 16)
        module(x).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    params = {n: p.detach().clone() for n, p in module.named_parameters()}
    meta = dict(model=to_dict(TINY), stage=stage, num_stages=num_stages, run_id="r")
    return module, opt, StageState(params=params, optimizer=opt.state_dict(), epoch=epoch, meta=meta)


def test_round_trip_restores_parameters_optimizer_state_and_epoch(tmp_path):
    module, opt, state = trained_state()
    path = checkpoint_path(str(tmp_path), 0, 2)
    digest = save_stage_state(path, state)
    assert path.name == "stage0of2.safetensors" and len(digest) == 64
    assert os.listdir(tmp_path) == [path.name]  # no temporary file left behind
    loaded = load_stage_state(path)
    assert loaded.epoch == 7 and loaded.meta == state.meta
    for name, tensor in state.params.items():
        assert torch.equal(loaded.params[name], tensor)
    fresh = torch.optim.AdamW(StageModule(TINY, 0, 2).parameters(), lr=1e-2)
    fresh.load_state_dict(loaded.optimizer)
    for index, entry in opt.state_dict()["state"].items():
        for key, value in entry.items():
            assert torch.equal(fresh.state_dict()["state"][index][key], value), (index, key)
    assert fresh.state_dict()["param_groups"] == opt.state_dict()["param_groups"]


def test_a_damaged_or_edited_checkpoint_is_refused(tmp_path):
    _, _, state = trained_state()
    path = checkpoint_path(str(tmp_path), 0, 2)
    save_stage_state(path, state)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # one bit of the last tensor's bytes
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="damaged or was edited"):
        load_stage_state(path)
    path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_stage_state(path)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_stage_state(tmp_path / "absent.safetensors")


def test_a_checkpoint_of_another_model_or_cut_is_refused():
    module, _, state = trained_state()
    check_model_matches(state.meta, to_dict(TINY), 0, 2, "ckpt")
    other = to_dict(ModelConfig(**{**to_dict(TINY), "hidden_size": 32}))
    with pytest.raises(CheckpointError, match="another model.*hidden_size"):
        check_model_matches(state.meta, other, 0, 2, "ckpt")
    with pytest.raises(CheckpointError, match="holds stage 0 of 2; this peer serves stage 1 of 2"):
        check_model_matches(state.meta, to_dict(TINY), 1, 2, "ckpt")
    bad = dict(state.params)
    name = next(iter(bad))
    bad[name] = bad[name].clone().fill_(float("nan"))
    with pytest.raises(CheckpointError, match="not finite"):
        check_stage_params(bad, module, "ckpt")
    del bad[name]
    with pytest.raises(CheckpointError, match="lacks 1"):
        check_stage_params(bad, module, "ckpt")


def test_parse_every():
    assert parse_every("10") == (10, 0.0)
    assert parse_every("300s") == (0, 300.0)
    assert parse_every("5m") == (0, 300.0)
    for bad in ("0", "-3", "soon", "0s", "nans"):
        with pytest.raises(ValueError, match="--checkpoint-every"):
            parse_every(bad)


def test_checkpointer_saves_when_due_and_resumes_its_count(tmp_path):
    _, _, state = trained_state()
    ck = StageCheckpointer(str(tmp_path), 0, 2, every_steps=2)
    snapshots = []

    def snapshot_at(epoch):
        def take():
            snapshots.append(epoch)
            return StageState(state.params, state.optimizer, epoch, state.meta)

        return take

    for epoch in range(0, 7):
        ck.maybe_save(epoch, snapshot_at(epoch))
        ck.wait()
    assert snapshots == [2, 4, 6] and ck.saves == 3 and ck.last_error is None
    assert load_stage_state(ck.path).epoch == 6
    ck2 = StageCheckpointer(str(tmp_path), 0, 2, every_steps=2)
    ck2.mark(6)  # restored from the file: nothing to save until two more steps
    assert not ck2.due(6) and not ck2.due(7) and ck2.due(8)
    timed = StageCheckpointer(str(tmp_path), 0, 2, every_s=60.0)
    assert not timed.due(3, now=timed.saved_at + 30) and timed.due(3, now=timed.saved_at + 61)


def test_a_failing_save_is_reported_and_does_not_raise(tmp_path):
    _, _, state = trained_state()
    blocker = tmp_path / "file"
    blocker.write_text("a file where the directory should be")
    ck = StageCheckpointer(str(blocker / "sub"), 0, 2, every_steps=1)
    ck.save_now(state)
    assert ck.saves == 0 and ck.last_error


def test_describe_checkpoints_finds_the_step_every_stage_reached(tmp_path):
    for stage, replica, epoch in [(0, 0, 5), (0, 1, 6), (1, 0, 4)]:
        _, _, state = trained_state(stage=stage, steps=0, epoch=epoch)
        save_stage_state(checkpoint_path(str(tmp_path / f"stage{stage}-{replica}"), stage, 2), state)
    found = describe_checkpoints(str(tmp_path))
    assert found["num_stages"] == 2 and found["step"] == 4 and found["files"] == 3
    assert found["model"] == to_dict(TINY)
    for path in tmp_path.glob("stage1-*/*"):
        path.unlink()
    with pytest.raises(CheckpointError, match=r"no checkpoint of stage\(s\) \[1\]"):
        describe_checkpoints(str(tmp_path))
    with pytest.raises(CheckpointError, match="no stage checkpoints"):
        describe_checkpoints(str(tmp_path / "empty"))
