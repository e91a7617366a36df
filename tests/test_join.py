"""`swarm join`: the stage choice (pure logic), its input checks, the dial-back request checks, the GPU path
(skipped without CUDA), and a live local swarm that a joiner enters, loads, serves and leaves (slow)."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import time

import pytest
import torch

from peers.cli import main
from peers.join import (
    announce_maddrs,
    choose_stage,
    own_dial_addrs,
    reachability_verdict,
    stage_loads,
)
from swarm.records import StageRecord
from swarm.transport import TransportError

PEER = "12D3KooWJbBQjdXFRJhdHR1gYhGyLDWMnq6QJh4jqNbRB6pP8oXW"


def rec(peer: str, stage: int, throughput: float = 0.0, state: str = "online") -> StageRecord:
    return StageRecord(peer_id=peer, stage=stage, state=state, throughput=throughput)


# ---- stage choice ------------------------------------------------------------------------------------------------
def test_lowest_total_throughput_wins():
    records = {0: [rec("a", 0, 10.0), rec("b", 0, 12.0)], 1: [rec("c", 1, 15.0)], 2: [rec("d", 2, 30.0)]}
    assert choose_stage(records, 3) == 1
    assert stage_loads(records, 3)[0].throughput == pytest.approx(22.0)


def test_empty_stage_first_then_fewest_peers_then_lowest_index():
    assert choose_stage({0: [rec("a", 0, 5.0)], 1: []}, 2) == 1  # a stage nobody serves
    assert choose_stage({}, 3) == 0  # nobody anywhere: the first stage
    # new peers announce 0 throughput until they have served: equal totals, fewer peers wins
    assert choose_stage({0: [rec("a", 0), rec("b", 0)], 1: [rec("c", 1)]}, 2) == 1
    assert choose_stage({0: [rec("a", 0, 4.0)], 1: [rec("b", 1, 4.0)]}, 2) == 0


def test_only_online_peers_count_and_excluded_ids_are_ignored():
    records = {
        0: [rec("a", 0, 50.0, state="offline"), rec("b", 0, 50.0, state="joining")],
        1: [rec("c", 1, 1.0)],
    }
    assert choose_stage(records, 2) == 0  # stage 0 has no online peer
    # a restarting peer's own earlier record does not count towards its stage
    records = {0: [rec("me", 0, 100.0), rec("x", 0, 1.0)], 1: [rec("y", 1, 50.0)]}
    assert choose_stage(records, 2) == 1
    assert choose_stage(records, 2, exclude=["me"]) == 0
    with pytest.raises(ValueError):
        choose_stage({}, 0)


# ---- inputs ------------------------------------------------------------------------------------------------------
def test_announce_addresses():
    assert announce_maddrs([], "203.0.113.7", 31338) == ["/ip4/203.0.113.7/tcp/31338"]
    assert announce_maddrs(["/ip4/198.51.100.1/tcp/4000"], "2001:db8::1", 5) == [
        "/ip4/198.51.100.1/tcp/4000",
        "/ip6/2001:db8::1/tcp/5",
    ]
    for bad in (["not-a-maddr"], [f"/ip4/1.2.3.4/tcp/1/p2p/{PEER}"]):
        with pytest.raises(ValueError):
            announce_maddrs(bad, None, 1)
    with pytest.raises(ValueError, match="not an IP"):
        announce_maddrs([], "example.org", 1)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--public-ip", "not-an-ip"], "--public-ip"),
        (["--announce-addr", "nonsense"], "--announce-addr"),
        (["--stage", "-1"], "--stage"),
        (["--grace", "-3"], "--grace"),
    ],
)
def test_bad_input_is_a_clear_error(argv, message, capsys, tmp_path):
    code = main(
        [
            "join",
            "--initial-peers",
            f"/ip4/127.0.0.1/tcp/9/p2p/{PEER}",
            "--identity",
            str(tmp_path / "id.key"),
            *argv,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "swarm: error:" in err and message in err and "Traceback" not in err


def test_corrupt_identity_file_is_a_clear_error(capsys, tmp_path):
    bad = tmp_path / "id.key"
    bad.write_bytes(b"this is not a key")
    code = main(["join", "--initial-peers", f"/ip4/127.0.0.1/tcp/9/p2p/{PEER}", "--identity", str(bad)])
    err = capsys.readouterr().err
    assert code == 2 and "not a libp2p private key" in err


def test_join_defaults_keep_identity_in_home():
    from peers.cli import build_parser

    args = build_parser().parse_args(["join", "--initial-peers", "x"])
    assert args.identity == os.path.join("~", ".swarm", "identity.key") and args.stage is None
    assert build_parser().parse_args(["serve", "--initial-peers", "x", "--stage", "0"]).identity is None


# ---- reachability ------------------------------------------------------------------------------------------------
def test_dialback_request_checks():
    from swarm.reachability import DIALBACK_MAX_ADDRS, dialback_addresses

    assert dialback_addresses([f"/ip4/127.0.0.1/tcp/5/p2p/{PEER}", "/ip4/127.0.0.1/tcp/5"], PEER) == [
        "/ip4/127.0.0.1/tcp/5"
    ]
    relay = f"/ip4/198.51.100.1/tcp/4/p2p/{PEER[:-4]}AAAA/p2p-circuit"
    assert dialback_addresses([relay], PEER) == [relay]
    other = PEER[:-4] + "BBBB"
    for bad in (
        None,
        [],
        ["/ip4/1.2.3.4/tcp/1"] * (DIALBACK_MAX_ADDRS + 1),
        ["garbage"],
        [5],
        [f"/ip4/127.0.0.1/tcp/5/p2p/{other}"],
        ["/ip4/1.2.3.4/tcp/" + "1" * 300],
    ):
        with pytest.raises(TransportError):
            dialback_addresses(bad, PEER)


def test_reachability_verdicts():
    ok = {"ok": True, "results": {"/ip4/1.2.3.4/tcp/5": "ok"}}
    failed = {"ok": True, "results": {"/ip4/1.2.3.4/tcp/5": "timed out after 10s"}}
    relayed = {
        "ok": True,
        "results": {"/ip4/1.2.3.4/tcp/5": "refused", "/ip4/9.9.9.9/tcp/1/p2p/R/p2p-circuit": "ok"},
    }
    assert reachability_verdict({"a": ok, "b": failed}) == "reachable"
    assert reachability_verdict({"a": failed}) == "unreachable"
    assert reachability_verdict({"a": relayed}) == "relay-only"
    assert reachability_verdict({"a": {"ok": False, "error": "busy"}}) == "unchecked"
    assert reachability_verdict({}) == "unchecked"
    assert own_dial_addrs([f"/ip4/127.0.0.1/tcp/5/p2p/{PEER}", "/ip4/127.0.0.1/tcp/5"], PEER) == [
        "/ip4/127.0.0.1/tcp/5"
    ]


def test_progress_bar_reports_size_without_averaging():
    """Without hivemind averaging there is nothing to download; the bar still closes with a clear line."""
    from peers.stage_peer import StateLoadProgress
    from swarm.config import model_preset
    from swarm.model import StageModule
    from swarm.optimizer import OptimizerConfig, StageOptimizer

    module = StageModule(model_preset("tiny"), 0, 2)
    optimizer = StageOptimizer(module, OptimizerConfig(averaging=False), None, "x")
    stream = io.StringIO()
    with StateLoadProgress(optimizer, 1, 0, stream=stream, interval_s=0.01):
        time.sleep(0.05)
    assert "swarm: stage 0: loaded state in" in stream.getvalue()


# ---- GPU path ----------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_stage_trains_under_autocast():
    from peers.stage_peer import autocast_dtype, describe_device, pick_device
    from swarm.config import model_preset
    from swarm.optimizer import OptimizerConfig
    from swarm.stage_server import StageServer, StageServerConfig

    device = pick_device("auto")
    assert device == "cuda"
    dtype = autocast_dtype(device)
    assert dtype == ("bfloat16" if torch.cuda.is_bf16_supported() else "float16")
    assert dtype in describe_device(device)
    model_cfg = model_preset("tiny")
    torch.cuda.reset_peak_memory_stats()
    server = StageServer(
        StageServerConfig(run_id="gpu", stage=1, num_stages=2, device=device, autocast_dtype=dtype),
        model_cfg,
        None,
        OptimizerConfig(averaging=False, target_batch_size=4),
    )
    before = server.param_checksum()
    for _ in range(2):
        x = torch.randn(4, 32, model_cfg.hidden_size)
        labels = torch.randint(0, model_cfg.vocab_size, (4, 32))
        x, logits, _ = server.compute.forward(x)
        assert logits.dtype == getattr(torch, dtype)  # computed in reduced precision
        loss_t, _ = server.compute.loss(logits, labels)
        loss, grad_in, _, _ = server.compute.backward_loss(x, loss_t)
        assert torch.isfinite(torch.tensor(loss)) and grad_in is not None and torch.isfinite(grad_in).all()
    assert all(
        p.dtype == torch.float32 and p.is_cuda for p in server.module.parameters()
    )  # weights stay fp32
    assert server.param_checksum() != before  # the optimizer stepped
    peak = torch.cuda.max_memory_allocated() / 2**20
    print(f"GPU {torch.cuda.get_device_name()}: autocast {dtype}, peak memory {peak:.1f} MiB")
    assert 0 < peak < 4096


# ---- live ----------------------------------------------------------------------------------------------------------
SHAPE = [
    "--stages",
    "2",
    "--seq-len",
    "64",
    "--microbatch-size",
    "8",
    "--target-batch-size",
    "16",
    "--lr",
    "3e-3",
]


def _client_call(swarm, fn):
    from swarm.network import create_dht

    dht = create_dht(swarm.run_id, swarm.initial_peers, client_mode=True)
    try:

        async def go():
            p2p = await dht.replicate_p2p()
            return await fn(dht, p2p)

        return asyncio.run(asyncio.wait_for(go(), 60))
    finally:
        dht.shutdown()


def _infos(swarm, peers):
    from swarm.stage_client import fetch_peer_info

    async def fn(dht, p2p):
        return {peer: await fetch_peer_info(p2p, swarm.run_id, peer) for peer in peers}

    return _client_call(swarm, fn)


def _state_of(swarm, stage: int, peer: str, want: str, timeout: float = 30.0) -> str:
    from swarm.network import create_dht, fetch_stage_peers

    dht = create_dht(swarm.run_id, swarm.initial_peers, client_mode=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            records = {p.peer_id: p.record.state for p in fetch_stage_peers(dht, swarm.run_id, 2)[stage]}
            if records.get(peer) == want or time.monotonic() > deadline:
                return records.get(peer)
            time.sleep(1.0)
    finally:
        dht.shutdown()


def _ctrl_c(child) -> None:
    """What a terminal's Ctrl-C does: SIGINT to the whole foreground process group (DHT process, p2pd too)."""
    os.killpg(child.proc.pid, signal.SIGINT)


@pytest.mark.slow
def test_join_goes_to_emptiest_stage_loads_state_and_leaves_cleanly(tmp_path):
    from peers.local import LocalSwarm

    swarm = LocalSwarm(str(tmp_path / "swarm"), run_id="jtest")
    identity = str(tmp_path / "home" / ".swarm" / "identity.key")
    join_cmd = [
        "join",
        "--run-id",
        swarm.run_id,
        "--initial-peers",
        None,
        "--identity",
        identity,
        "--threads",
        "1",
        "--grace",
        "5",
    ]
    try:
        swarm.start_dht(SHAPE)
        join_cmd[join_cmd.index(None)] = swarm.initial_peers[0]
        stage_peers = [swarm.start_stage(s, wait=False) for s in (0, 0, 1)]
        for child in stage_peers:
            child.wait_event("serve", 120)
        metrics = tmp_path / "m.jsonl"
        trainer = swarm.start_trainer(
            ["--steps", "3", "--metrics-out", str(metrics), "--summary-json", str(tmp_path / "s.json")]
        )
        deadline = time.monotonic() + 300  # 3 optimizer steps: every stage peer has measured its throughput
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            assert time.monotonic() < deadline and trainer.proc.poll() in (None, 0), open(
                trainer.log_path
            ).read()[-3000:]
            time.sleep(0.5)
        swarm.kill(trainer, signal.SIGTERM)  # the swarm is idle from here on

        joiner = swarm.spawn("join1", "stage", join_cmd)
        choice = joiner.wait_event("join", 120)
        loads = {load["stage"]: load for load in choice["loads"]}
        assert (
            loads[0]["peers"] == 2
            and loads[1]["peers"] == 1
            and all(v["throughput"] > 0 for v in loads.values())
        )
        # throughput is each peer's measured compute rate: on a loaded machine stage 0's two peers can measure less
        # than stage 1's one (seen once); the choice must follow the announced totals
        want = min(loads.values(), key=lambda v: (v["throughput"], v["peers"], v["stage"]))["stage"]
        assert choice["stage"] == want and choice["reason"] == "least capacity", choice
        stage = choice["stage"]
        served = joiner.wait_event("serve", 180)
        peer_id = served["peer_id"]
        assert served["stage"] == stage and served["device"] == "cpu" and served["autocast"] is None
        reach = joiner.wait_event("reachability", 90)
        assert reach["verdict"] == "reachable", reach

        # the joiner holds the stage's current state: same epoch and (nearly) the same weights as its replica
        old = next(c for c in stage_peers if c.stage == stage).info["peer_id"]
        infos = _infos(swarm, [old, peer_id])
        # the trainer ran 3 steps; a replica's own epoch can trail by an averaging round that had not closed (CI saw 1)
        assert infos[old]["epoch"] >= 1
        assert infos[peer_id]["epoch"] == infos[old]["epoch"]
        assert infos[peer_id]["param_checksum"] == pytest.approx(infos[old]["param_checksum"], rel=1e-6)
        assert _state_of(swarm, stage, peer_id, "online") == "online"
        log = open(joiner.log_path).read()
        assert "MiB of state" in log and f"state from {loads[stage]['peers']} replica(s)" in log, log[-3000:]

        _ctrl_c(joiner)
        assert joiner.proc.wait(timeout=60) == 0, open(joiner.log_path).read()[-3000:]
        left = joiner.wait_event("left", 5)
        assert left["peer_id"] == peer_id and left["inflight_left"] == 0
        assert _state_of(swarm, stage, peer_id, "offline") == "offline"

        # a restart with the same identity file is the same peer; this time it announces an address where nobody
        # listens: the dial-back fails, it says what to open and (--require-reachable) leaves
        again = swarm.spawn(
            "join2", "stage", join_cmd + ["--announce-addr", "/ip4/127.0.0.1/tcp/1", "--require-reachable"]
        )
        second = again.wait_event("serve", 180)
        assert second["peer_id"] == peer_id
        reach = again.wait_event("reachability", 90)
        assert reach["verdict"] == "unreachable" and reach["addrs"] == ["/ip4/127.0.0.1/tcp/1"], reach
        assert again.proc.wait(timeout=60) == 2
        log = open(again.log_path).read()
        assert "could not connect to this peer" in log and "open TCP port" in log and "--public-ip" in log, (
            log[-3000:]
        )
        assert "swarm: error: --require-reachable" in log and "Traceback" not in log
        assert _state_of(swarm, second["stage"], peer_id, "offline") == "offline"
    finally:
        swarm.stop()
    for child in swarm.children:
        assert child.proc.poll() is not None, f"{child.name} still running"


@pytest.mark.slow
def test_dial_back_reaches_only_the_caller():
    """The dial-back probe connects from a fresh host: the caller's own listening address succeeds, a closed port
    fails, and an address where another peer listens fails the libp2p handshake, and both failures read the same."""
    from hivemind.p2p import P2P

    from swarm.reachability import UNREACHABLE, dial_back

    async def go():
        caller, other = await P2P.create(), await P2P.create()
        try:
            addrs = [str(a).split("/p2p/")[0] for a in await caller.get_visible_maddrs()]
            mine = await dial_back(caller.peer_id, addrs + ["/ip4/127.0.0.1/tcp/1"], 5)
            theirs = await dial_back(other.peer_id, addrs, 5)
            return addrs, mine, theirs
        finally:
            await caller.shutdown()
            await other.shutdown()

    addrs, mine, theirs = asyncio.run(asyncio.wait_for(go(), 60))
    assert mine[addrs[0]] == "ok" and mine["/ip4/127.0.0.1/tcp/1"] != "ok"
    assert theirs[addrs[0]] != "ok"
    # not a port-scanning oracle: a closed port and another libp2p node answer alike
    assert mine["/ip4/127.0.0.1/tcp/1"] == theirs[addrs[0]] == UNREACHABLE


def test_drain_waits_for_inflight_work_and_refuses_new_work():
    """A leaving server announces offline, refuses new micro-batches (without blaming the sender) and waits, up to
    its grace period, for the ones in flight."""
    from types import SimpleNamespace

    from swarm.config import model_preset
    from swarm.optimizer import OptimizerConfig
    from swarm.stage_server import StageServer, StageServerConfig
    from swarm.transport import TensorLimits, receive

    server = StageServer(
        StageServerConfig(run_id="d", stage=0, num_stages=2),
        model_preset("tiny"),
        None,
        OptimizerConfig(averaging=False),
    )

    async def go():
        server.inflight = 1
        draining = asyncio.ensure_future(server.drain(5.0))
        await asyncio.sleep(0.3)
        assert not draining.done() and server.draining  # still waiting for the micro-batch in flight
        replies = [m async for m in server.rpc_chain(None, SimpleNamespace(remote_id="QmCaller"))]
        server.inflight -= 1  # the micro-batch in flight completes
        left = await asyncio.wait_for(draining, 2)
        server.inflight = 1  # one that never finishes: the grace period bounds the wait
        started = time.monotonic()
        stuck = await server.drain(0.2)
        return left, stuck, time.monotonic() - started, replies

    left, stuck, waited, replies = asyncio.run(go())
    assert left == 0 and stuck == 1 and waited < 1.0

    async def decode():
        async def stream():
            for m in replies:
                yield m

        return (await receive(stream(), TensorLimits())).metadata

    reply = asyncio.run(decode())
    assert reply["ok"] is False and "leaving" in reply["error"] and reply["no_fault"] is True  # nobody blamed
