"""`swarm export` and resuming a swarm (swarm.export, swarm.checkpoint): the per-stage verification against fake
replicas in-process, then live local swarms (slow): train, export, load with transformers, resume from
checkpoints, and an exporter facing a replica that serves tampered weights."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys

import pytest
import torch

from peers.common import PARENT_PID_ENV
from swarm.config import ModelConfig
from swarm.export import ExportError, gather_stage
from swarm.model import StageModule
from swarm.replica_sync import param_sketch
from swarm.transport import pack

TINY = ModelConfig(
    vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=2, intermediate_size=32
)


class FakeReplica:
    """A stage replica's two export RPCs over in-memory messages (the same packing as the stage server's)."""

    def __init__(self, module, scale=1.0, epoch=3, log=None):
        self.module, self.scale, self.epoch, self.log = module, scale, epoch, log if log is not None else []
        self.seeds = []

    async def rpc_parameters(self, request):
        self.log.append(("download", self))
        names = [n for n, _ in self.module.named_parameters()]
        tensors = [p.detach() * self.scale for p in self.module.parameters()]
        messages = pack({"ok": True, "epoch": self.epoch, "names": names}, tensors)

        async def stream():
            for m in messages:
                yield m

        return stream()

    async def rpc_state_sketch(self, request, **kwargs):
        import msgpack

        meta = msgpack.unpackb(request.metadata)
        self.seeds.append(meta["seed"])
        self.log.append(("sketch", self))
        sketch = param_sketch(list(self.module.parameters()), meta["seed"], meta["dims"])  # its true weights
        return pack({"ok": True, "epoch": self.epoch, "sketch": [float(v) for v in sketch]})[0]


def gather(replicas, seed=0):
    module = StageModule(TINY, 1, 2)
    stub_of = dict(replicas).__getitem__
    return asyncio.run(
        gather_stage(
            stub_of,
            1,
            module,
            [name for name, _ in replicas],
            sketch_dims=32,
            tolerance=0.05,
            timeout=30,
            rng=random.Random(seed),
        )
    )


def test_a_tampered_replica_is_refused_and_an_honest_one_exported():
    module = StageModule(TINY, 1, 2)
    for seed in range(4):  # whichever replica is asked first
        log = []
        replicas = [
            ("honest-a", FakeReplica(module, log=log)),
            ("liar", FakeReplica(module, scale=5.0, log=log)),
            ("honest-b", FakeReplica(module, log=log)),
        ]
        got = gather(replicas, seed)
        # the liar holds the honest weights and sketches them truly: it vouches for the honest download too
        assert got.source.startswith("honest") and got.verified_by == 2 and got.epoch == 3
        assert [p for p, _ in got.refused] in ([], ["liar"])
        for name, param in module.named_parameters():
            assert torch.equal(got.params[name], param.detach())
        # every sketch seed was sent after the download it checks: no source knew it in advance
        first_download = log.index(next(e for e in log if e[0] == "download"))
        assert all(e[0] == "download" for e in log[: first_download + 1])


def test_no_quorum_is_a_clear_error_and_one_replica_is_taken_unverified():
    module, poisoned = StageModule(TINY, 1, 2), StageModule(TINY, 1, 2)
    with torch.no_grad():
        for param in poisoned.parameters():
            param.mul_(5.0)  # a replica whose own weights are poisoned: its sketches disagree too
    with pytest.raises(ExportError, match="no replica's parameters are vouched for"):
        gather([("honest", FakeReplica(module)), ("poisoned", FakeReplica(poisoned))])
    alone = gather([("only", FakeReplica(module))])
    assert alone.verified_by == 0 and "only replica" in alone.verdict
    # alone, a replica that serves tampered weights is caught by its own sketch of the weights it holds
    with pytest.raises(ExportError, match="differs from its own sketch"):
        gather([("liar", FakeReplica(module, scale=5.0))])


def test_a_download_of_the_wrong_shape_or_nonfinite_is_refused():
    other = StageModule(ModelConfig(**{**TINY.__dict__, "intermediate_size": 48}), 1, 2)
    broken = StageModule(TINY, 1, 2)
    with torch.no_grad():
        next(broken.parameters()).fill_(float("inf"))
    with pytest.raises(ExportError) as refused:
        gather([("wrong-shape", FakeReplica(other)), ("inf", FakeReplica(broken))])
    assert "has shape" in str(refused.value) and "is not finite" in str(refused.value)


def test_a_download_cut_short_is_asked_again_once(monkeypatch):
    """hivemind ends a broken stream as if it were complete: a short answer is asked again (after the replica's
    cooldown), once; a second short answer from the same replica is its refusal."""
    import swarm.export

    monkeypatch.setattr(swarm.export, "PARAMS_COOLDOWN_S", 0.0)
    module = StageModule(TINY, 1, 2)

    class CutOff(FakeReplica):
        def __init__(self, module, cuts):
            super().__init__(module)
            self.cuts = cuts

        async def rpc_parameters(self, request):
            full = await super().rpc_parameters(request)
            self.cuts -= 1
            if self.cuts < 0:
                return full
            messages = [m async for m in full]

            async def cut():
                for m in messages[:-3]:
                    yield m

            return cut()

    flaky = CutOff(module, cuts=1)
    got = gather([("flaky", flaky)])
    assert got.source == "flaky" and [p for p, _ in got.refused] == ["flaky"]
    assert "tensors for" in got.refused[0][1] and len([e for e in flaky.log if e[0] == "download"]) == 2
    with pytest.raises(ExportError, match="tensors for"):
        gather([("broken", CutOff(module, cuts=2))])


# ---- live --------------------------------------------------------------------------------------------------------
# the commands these tests start leave with the test process, however it ends (peers.common.die_with_parent)
WITH_US = {**os.environ, PARENT_PID_ENV: str(os.getpid())}


def _local(args, tmp, name, timeout=600):
    proc = subprocess.run(
        [sys.executable, "-m", "peers.cli", "local", "--workdir", str(tmp / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=WITH_US,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp / name / "metrics.jsonl").read_text().splitlines()]
    return proc, rows


@pytest.mark.slow
def test_train_export_load_with_transformers_then_resume_from_checkpoints(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from swarm.checkpoint import describe_checkpoints
    from swarm.config import DataConfig
    from swarm.data import load_token_blocks

    ck, out = tmp_path / "ck", tmp_path / "model"
    shape = ["--stages", "2", "--replicas", "1", "--checkpoint-dir", str(ck), "--checkpoint-every", "1"]
    first, rows1 = _local([*shape, "--steps", "3", "--export", str(out)], tmp_path, "run1")
    assert [r["step"] for r in rows1] == [0, 1, 2]
    assert sorted(p.name for p in ck.rglob("*.safetensors")) == [
        "stage0of2.safetensors",
        "stage1of2.safetensors",
    ]

    # the export loads with transformers, and its loss on the held-out blocks is the swarm's own evaluation
    summary = json.loads((out / "swarm.json").read_text())
    epochs = [s["epoch"] for s in summary["stages"]]
    # 3 trainer steps; a stage's last step can still be closing when the export reads it (hivemind steps once its
    # tracker sees the target batch reached), so 2 or 3
    assert set(epochs) <= {2, 3} and summary["step"] == min(epochs), summary
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    blocks = load_token_blocks(DataConfig(seq_len=128, microbatch_size=1), tokenizer)[
        -summary["eval_blocks"] :
    ]
    with torch.no_grad():
        losses = [model(blocks[i : i + 8], labels=blocks[i : i + 8]).loss for i in range(0, len(blocks), 8)]
    loss = float(sum(float(x) * min(8, len(blocks) - 8 * i) for i, x in enumerate(losses)) / len(blocks))
    assert abs(loss - summary["eval_loss"]) < 1e-4 * max(1.0, loss), (loss, summary["eval_loss"])
    assert loss < 8.0  # trained: an untrained model of 4096 tokens starts near ln(4096) = 8.3
    generated = model.generate(tokenizer("def main():", return_tensors="pt").input_ids, max_new_tokens=8)
    assert generated.shape[1] > 3 and "model.safetensors" in os.listdir(out)
    assert "from_pretrained" in (out / "README.md").read_text()

    # every peer stopped; a new swarm from the same checkpoint directory continues from the saved step (the newest
    # epoch every stage's checkpoint reached: each peer saves once more as it leaves), where the loss was
    saved = describe_checkpoints(str(ck))["step"]
    assert saved in (2, 3), saved
    second, rows2 = _local([*shape, "--steps", "2"], tmp_path, "run2")
    assert "resuming from the checkpoints" in second.stdout
    assert [r["step"] for r in rows2] == [saved, saved + 1]
    assert rows2[0]["loss"] < rows1[0]["loss"] - 0.3, (rows1, rows2)
    assert abs(rows2[0]["loss"] - rows1[-1]["loss"]) < 0.5, (rows1, rows2)
    logs = "".join(p.read_text() for p in (tmp_path / "run2").glob("stage*.log"))
    assert "restored from" in logs and f"at epoch {saved}" in logs


@pytest.mark.slow
def test_export_refuses_a_replica_serving_tampered_weights(tmp_path):
    from peers.local import LocalSwarm

    swarm = LocalSwarm(str(tmp_path / "swarm"), run_id="xtest")
    try:
        swarm.start_dht(["--stages", "2"])
        peers = [swarm.start_stage(0, wait=False)]
        peers += [swarm.start_stage(1, wait=False, name=f"honest{i}") for i in range(2)]
        liar = swarm.start_stage(1, wait=False, name="liar", extra=["--attack", "avg-state"])
        for child in [*peers, liar]:
            child.wait_event("serve", 180)

        def export(out, expect):
            proc = subprocess.run(
                [sys.executable, "-m", "peers.cli", "export", "--run-id", "xtest", "--initial-peers",
                 *swarm.initial_peers, "--out", str(out), "--eval-blocks", "0", "--threads", "1"],
                capture_output=True, text=True, timeout=300, env=WITH_US,
            )  # fmt: skip
            assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-3000:]
            return proc

        ok = export(tmp_path / "model", 0)
        event = json.loads(
            next(line[len("SWARM exported ") :] for line in ok.stdout.splitlines() if "exported" in line)
        )
        stage1 = event["stages"][1]
        assert stage1["source"] != liar.info["peer_id"] and stage1["verified_by"] >= 1
        summary = json.loads((tmp_path / "model" / "swarm.json").read_text())
        refused = summary["stages"][1]["refused"]
        assert all(
            peer == liar.info["peer_id"] for peer, _ in refused
        )  # only the liar, if it was asked at all
        honest = StageModule(ModelConfig(), 1, 2)  # at epoch 0 every honest replica holds the seed's weights
        from safetensors.torch import load_file

        weights = load_file(str(tmp_path / "model" / "model.safetensors"))
        for name, param in honest.named_parameters():
            assert torch.allclose(weights[name], param.detach()), name

        for child in peers[1:]:  # the liar is stage 1's last replica: nothing vouches for what it serves
            swarm.kill(child)
        failed = subprocess.run(
            [sys.executable, "-m", "peers.cli", "export", "--run-id", "xtest", "--initial-peers",
             *swarm.initial_peers, "--out", str(tmp_path / "none"), "--eval-blocks", "0", "--threads", "1"],
            capture_output=True, text=True, timeout=300, env=WITH_US,
        )  # fmt: skip
        assert failed.returncode == 2, failed.stdout[-2000:] + failed.stderr[-2000:]
        lines = [line for line in failed.stderr.splitlines() if line.startswith("swarm: error:")]
        assert (
            len(lines) == 1
            and "no quorum" in lines[0]
            and "differs from its own sketch" in lines[0]
            and "Traceback" not in failed.stderr
        ), failed.stderr[-2000:]
        assert not (tmp_path / "none").exists()
    finally:
        swarm.stop()


BOOTSTRAP = "/ip4/127.0.0.1/tcp/1/p2p/QmRFnbja9E1fh8J97BqyRhV5E1h7daep8bLxrrL7ByceYV"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["serve", "--stage", "0", "--checkpoint-every", "soon"], "--checkpoint-every takes a number"),
        (
            ["serve", "--stage", "0", "--resume-from", "/nonexistent/dir"],
            "--resume-from /nonexistent/dir: no such",
        ),
        (["join", "--checkpoint-every", "0"], "--checkpoint-every takes a number"),
        (["export", "--out", "x", "--eval-data", "/nonexistent.txt"], "/nonexistent.txt"),
    ],
)
def test_bad_checkpoint_and_export_flags_are_one_line_errors(argv, message, capsys, tmp_path, monkeypatch):
    from peers.cli import main

    monkeypatch.setenv(
        "HOME", str(tmp_path)
    )  # join would make its identity file there (it must not get that far)
    assert main([*argv, "--initial-peers", BOOTSTRAP]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("swarm: error:") and message in err[0], err
    assert not (tmp_path / ".swarm").exists()


def test_dht_resume_from_a_directory_without_checkpoints_is_a_clear_error(capsys, tmp_path):
    from peers.cli import main

    assert main(["dht", "--resume-from", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no stage checkpoints" in err and err.count("swarm: error:") == 1


def test_an_export_round_trips_through_transformers_and_back_into_stages(tmp_path):
    from transformers import AutoModelForCausalLM

    from swarm.data import load_tokenizer
    from swarm.export import export_summary, load_export_stage, pipeline_loss, stage_modules, write_export

    cfg = ModelConfig(
        vocab_size=4096, hidden_size=16, num_layers=3, num_heads=2, num_kv_heads=1, intermediate_size=32
    )
    modules = [StageModule(cfg, s, 2) for s in range(2)]
    params = {n: p.detach().clone() for m in modules for n, p in m.named_parameters()}
    blocks = torch.randint(0, 4096, (5, 12))
    own = pipeline_loss(
        stage_modules(cfg, 2, {s: dict(m.named_parameters()) for s, m in enumerate(modules)}), blocks
    )
    summary = export_summary("r", cfg, 2, 12, [], None, own, 5)
    out = write_export(str(tmp_path / "m"), cfg, params, load_tokenizer(None), summary)
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        assert abs(float(model(blocks, labels=blocks).loss) - own) < 1e-5
    for stage in range(2):
        state = load_export_stage(str(out), stage, 2)
        assert state.optimizer is None and state.meta["stage"] == stage
        for name, param in modules[stage].named_parameters():
            assert torch.equal(state.params[name], param.detach())
    with pytest.raises(Exception, match="exists and is not empty"):
        write_export(str(out), cfg, params, load_tokenizer(None), summary)
    (out / "swarm.json").write_text('{"model": {"hidden_size": -1}}')
    with pytest.raises(Exception, match="no valid model config"):
        load_export_stage(str(out), 0, 2)


def test_a_new_swarm_resumes_from_an_export_or_from_checkpoints(tmp_path):
    """What `swarm dht --resume-from` publishes: the model (and, for checkpoints, the cut) found there, and the step."""
    from peers.dht_peer import resume_point
    from swarm.checkpoint import StageState, checkpoint_path, save_stage_state
    from swarm.config import to_dict
    from swarm.data import load_tokenizer
    from swarm.export import export_summary, write_export

    cfg = ModelConfig(
        vocab_size=4096, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=2, intermediate_size=32
    )
    modules = [StageModule(cfg, s, 2) for s in range(2)]
    params = {n: p.detach().clone() for m in modules for n, p in m.named_parameters()}
    summary = export_summary("r", cfg, 2, 12, [], None, None, 0) | {"step": 7}
    write_export(str(tmp_path / "export"), cfg, params, load_tokenizer(None), summary)
    point = resume_point(str(tmp_path / "export"))
    assert point == {"model": to_dict(cfg), "num_stages": None, "step": 7, "source": "export"}
    for stage, epoch in [(0, 5), (1, 4)]:
        meta = dict(model=to_dict(cfg), stage=stage, num_stages=2)
        state = StageState(dict(modules[stage].named_parameters()), None, epoch, meta)
        save_stage_state(checkpoint_path(str(tmp_path / "ck" / f"stage{stage}-0"), stage, 2), state)
    point = resume_point(str(tmp_path / "ck"))
    assert point == {"model": to_dict(cfg), "num_stages": 2, "step": 4, "source": "checkpoints"}
    with pytest.raises(ValueError, match="no such directory"):
        resume_point(str(tmp_path / "absent"))
