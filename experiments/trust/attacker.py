"""An outsider attacking a live swarm's trust boundary from its own process (issue 13's adversarial suite).

It joins the swarm's DHT with identities of its own (as anyone may) and tries, against the real peers:

    config        publishes its own ``{run}.config`` (created_at=0, other stages and lr): a fresh reader must still
                  read the creator's
    stage-record  announces a stage record that names an honest peer, at another stage and offline
    blacklists    three fresh identities publish blacklists naming an honest peer
    forged-header asks the last stage to compute a micro-batch under a header that names another trainer
    rewritten-mb  its own valid header with the micro-batch id changed afterwards
    replay        the same valid request twice (the second must be refused at once, not wait for labels)
    big-labels    a label deposit of 8 x the swarm's sequence length
    many-labels   100 label deposits (at most max_label_deposits are held per trainer)
    stalled       a chain request whose stream never finishes (the server drops it; meanwhile it serves others)
    junk          2,000 malformed requests (random metadata and tensors)

and writes one JSON line per attack (``attack``, ``refused`` and what it saw) to stdout, then ``done``. Which
outcome counts as defended is the test's call (``tests/test_trust_live.py``).

    python experiments/trust/attacker.py --initial-peers ADDR --run-id RUN --honest PEER_STAGE0 --last PEER_STAGE1
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

import torch  # noqa: E402
from hivemind.p2p import PeerID  # noqa: E402
from hivemind.utils import get_dht_time  # noqa: E402

from peers.common import die_with_parent  # noqa: E402
from swarm.network import create_dht, fetch_stage_peers, fetch_swarm_config, identity_key, owner_subkey  # noqa: E402
from swarm.protocol import ChainHeader  # noqa: E402
from swarm.records import (  # noqa: E402
    BlacklistRecord,
    StageRecord,
    SwarmConfigRecord,
    blacklist_key,
    config_key,
    stage_key,
)
from swarm.stage_server import StageServer, namespace  # noqa: E402
from swarm.transport import TensorLimits, aiter_messages, call, pack, receive, single  # noqa: E402


def emit(attack: str, **fields) -> None:
    print(json.dumps(dict(attack=attack, **fields), default=str), flush=True)


class Attacker:
    def __init__(self, args):
        self.args = args
        self.dht = create_dht(args.run_id, [args.initial_peers])
        self.key = identity_key(self.dht)
        self.me = str(self.dht.peer_id)
        self.config = fetch_swarm_config(self.dht, args.run_id)
        self.p2p = None

    def stub(self, peer: str):
        return StageServer.get_stub(self.p2p, PeerID.from_base58(peer), namespace=namespace(self.args.run_id))

    def store(self, dht, key: str, value: dict, ttl: float = 120.0) -> bool:
        return bool(dht.store(key, value, get_dht_time() + ttl, subkey=owner_subkey(dht)))

    # ---- DHT records -------------------------------------------------------------------------------------------
    def forged_config(self) -> None:
        forged = SwarmConfigRecord(**{**self.config.__dict__, "created_at": 0.0, "num_stages": 3, "lr": 9.5})
        stored = self.store(self.dht, config_key(self.args.run_id), forged.to_value())
        reader = create_dht(self.args.run_id, [self.args.initial_peers])
        try:
            seen = fetch_swarm_config(reader, self.args.run_id)
        finally:
            reader.shutdown()
        emit(
            "config",
            stored=stored,
            refused=(seen.num_stages, seen.lr) == (self.config.num_stages, self.config.lr),
            read=dict(num_stages=seen.num_stages, lr=seen.lr),
        )

    def stage_record(self) -> None:
        lie = StageRecord(peer_id=self.args.honest, stage=1, state="offline", updated_at=get_dht_time())
        stored = self.store(self.dht, stage_key(self.args.run_id, 1), lie.to_value())
        time.sleep(1.0)
        peers = fetch_stage_peers(self.dht, self.args.run_id, self.config.num_stages)
        at0 = [(p.peer_id, p.record.state) for p in peers.get(0, [])]
        at1 = [p.peer_id for p in peers.get(1, [])]
        emit(
            "stage-record",
            stored=stored,
            refused=(self.args.honest, "online") in at0 and self.args.honest not in at1,
            stage0=at0,
            stage1=at1,
        )

    def blacklists(self) -> None:
        stored = []
        sybils = [create_dht(self.args.run_id, [self.args.initial_peers]) for _ in range(3)]
        try:
            for sybil in sybils:
                record = BlacklistRecord(
                    publisher=str(sybil.peer_id),
                    issued_at=get_dht_time(),
                    entries={self.args.honest: {"reason": "made up", "reporters": 3, "strikes": 99}},
                )
                stored.append(self.store(sybil, blacklist_key(self.args.run_id), record.to_value()))
        finally:
            for sybil in sybils:
                sybil.shutdown()
        emit(
            "blacklists", stored=stored, refused=None
        )  # the verdict is read from the honest peers afterwards

    # ---- the chain protocol ------------------------------------------------------------------------------------
    def tokens(self, batch=None, seq=None) -> torch.Tensor:
        return torch.randint(0, 100, (batch or self.config.microbatch_size, seq or self.config.seq_len))

    def header(self, mb: str, tokens: torch.Tensor, trainer: str = None, route=None, key=None):
        return ChainHeader.create(
            key or self.key,
            run_id=self.args.run_id,
            trainer=trainer or self.me,
            mb=mb,
            step=0,
            route=route or [self.args.honest, self.args.last],
            tokens=tokens,
            now=time.time(),
        )

    async def deposit(self, peer: str, mb: str, labels: torch.Tensor) -> dict:
        reply = await self.stub(peer).rpc_labels(aiter_messages(pack({"mb": mb}, [labels])), timeout=30)
        return (await receive(single(reply), TensorLimits())).metadata

    async def chain(self, peer: str, meta: dict, tensor: torch.Tensor, timeout: float = 60) -> dict:
        return (
            await call(self.stub(peer).rpc_chain, pack(meta, [tensor]), TensorLimits(), timeout=timeout)
        ).metadata

    async def forged_header(self) -> None:
        """The label swap: as the route's stage-0 peer, ask the last stage to compute under a header that names
        another trainer (whose labels it holds), signed with this attacker's own key."""
        tokens = self.tokens()
        header, reveal = self.header(
            "f1.0", tokens, trainer=self.args.trainer, route=[self.me, self.args.last]
        )
        activations = torch.randn(
            self.config.microbatch_size, self.config.seq_len, int(self.config.model.get("hidden_size", 192))
        )
        reply = await self.chain(self.args.last, dict(header=header.to_wire(), audit=reveal), activations)
        emit(
            "forged-header",
            refused="reports" not in reply and "bad header" in str(reply.get("error")),
            reply=reply,
        )

    async def rewritten_mb(self) -> None:
        tokens = self.tokens()
        header, reveal = self.header("r1.0", tokens)
        wire = dict(header.to_wire(), mb="r2.0")
        reply = await self.chain(self.args.honest, dict(header=wire, audit=reveal), tokens)
        emit(
            "rewritten-mb",
            refused="reports" not in reply and "bad header" in str(reply.get("error")),
            reply=reply,
        )

    async def replay(self) -> None:
        """As a (legitimate) trainer: one valid micro-batch, then the very same request again."""
        tokens = self.tokens()
        header, reveal = self.header("p1.0", tokens)
        deposited = await self.deposit(self.args.last, "p1.0", tokens)
        meta = dict(header=header.to_wire(), audit=reveal)
        first = await self.chain(self.args.honest, meta, tokens)
        started = time.monotonic()
        second = await self.chain(self.args.honest, meta, tokens)
        waited = time.monotonic() - started
        reports = second.get("reports") or [{}]
        emit(
            "replay",
            deposited=deposited,
            first_ok=(first.get("reports") or [{}])[0].get("ok"),
            refused=reports[0].get("ok") is False and waited < 10,
            waited_s=round(waited, 2),
            error=reports[-1].get("error"),
        )

    async def big_labels(self) -> None:
        reply = await self.deposit(self.args.last, "b1.0", self.tokens(seq=8 * self.config.seq_len))
        emit("big-labels", refused=reply.get("ok") is False, reply=reply)

    async def many_labels(self) -> None:
        replies = [await self.deposit(self.args.last, f"m{i}.0", self.tokens()) for i in range(100)]
        taken = sum(r.get("ok") is True for r in replies)
        emit("many-labels", refused=taken <= 64, taken=taken, last=replies[-1])

    async def stalled(self) -> None:
        """A chain request whose stream sends its first message and then nothing: the peer must drop it at its read
        deadline and keep serving others meanwhile."""
        tokens = self.tokens()
        header, reveal = self.header("s1.0", tokens)
        messages = pack(dict(header=header.to_wire(), audit=reveal), [tokens], chunk_bytes=2048)
        forever = asyncio.Event()

        async def stall():
            yield messages[0]
            # then nothing for 90 s (past the peer's 60 s read deadline), and the stream ends: hivemind's client reads
            # the reply only once its requests are done, so the refusal the peer sent at its deadline is read then
            # (had the peer still been reading, it would answer that the message was cut short instead)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(forever.wait(), 90)

        started = time.monotonic()
        task = asyncio.ensure_future(
            receive(await self.stub(self.args.honest).rpc_chain(stall()), TensorLimits())
        )
        await asyncio.sleep(1.0)
        info_started = time.monotonic()
        during = (
            await receive(
                single(await self.stub(self.args.honest).rpc_info(pack({})[0], timeout=20)), TensorLimits()
            )
        ).metadata
        info_s = time.monotonic() - info_started
        await asyncio.sleep(70.0)  # past the peer's 60 s read deadline; the stream is still open on this side
        after = (
            await receive(
                single(await self.stub(self.args.honest).rpc_info(pack({})[0], timeout=20)), TensorLimits()
            )
        ).metadata
        try:
            reply = (await asyncio.wait_for(task, 60)).metadata
        except Exception as e:  # the peer gave the stream up: hivemind resets it once the reply is written
            reply = {"exception": repr(e)}
        emit(
            "stalled",
            refused=during.get("inflight", 0) >= 1 and after.get("inflight") == 0,
            inflight_during=during.get("inflight"),
            inflight_after_deadline=after.get("inflight"),
            after_s=round(time.monotonic() - started, 1),
            served_meanwhile=bool(during),
            info_s=round(info_s, 2),
            reply=reply,
        )

    async def junk(self, count: int = 2000) -> None:
        rng = random.Random(0)
        answered, accepted, errors = 0, 0, {}
        for i in range(count):
            meta = {
                rng.choice(["header", "audit", "mb", "x"]): rng.choice(
                    [None, 1, "x" * rng.randrange(200), b"\0"]
                )
            }
            tensor = rng.choice(
                [
                    torch.randn(rng.randrange(1, 4), rng.randrange(1, 8)),
                    torch.zeros(0),
                    torch.full((2, 2), float("nan")),
                    torch.randint(0, 10, (3,)),
                ]
            )
            try:
                reply = await self.chain(
                    self.args.last if i % 2 else self.args.honest, meta, tensor, timeout=20
                )
            except Exception as e:  # the stream itself failed (no reply): counted, and the attack goes on
                errors[type(e).__name__ + ": " + str(e)[:80]] = (
                    errors.get(type(e).__name__ + ": " + str(e)[:80], 0) + 1
                )
                continue
            answered += 1
            accepted += not (
                reply.get("ok") is False or (reply.get("reports") and not reply["reports"][0]["ok"])
            )
        info = await self.stub(self.args.honest).rpc_info(pack({})[0], timeout=20)  # still serving?
        emit(
            "junk",
            refused=accepted == 0 and bool(info.metadata),
            answered=answered,
            accepted=accepted,
            stream_errors=errors,
            sent=count,
        )

    async def run(self, attacks) -> None:
        self.p2p = await self.dht.replicate_p2p()
        # the stalled stream waits out the peer's read deadline (a minute) while the other attacks go on
        stalled = asyncio.ensure_future(self.stalled()) if "stalled" in attacks else None
        for attack in [a for a in attacks if a != "stalled"]:
            try:
                if attack == "config":
                    await asyncio.get_event_loop().run_in_executor(None, self.forged_config)
                elif attack == "stage-record":
                    await asyncio.get_event_loop().run_in_executor(None, self.stage_record)
                elif attack == "blacklists":
                    await asyncio.get_event_loop().run_in_executor(None, self.blacklists)
                else:
                    await getattr(self, attack.replace("-", "_"))()
            except Exception as e:
                emit(attack, refused=None, error=repr(e)[:300])
        if stalled is not None:
            try:
                await stalled
            except Exception as e:
                emit("stalled", refused=None, error=repr(e)[:300])
        emit("done")


ATTACKS = [
    "config",
    "stage-record",
    "blacklists",
    "forged-header",
    "rewritten-mb",
    "replay",
    "big-labels",
    "many-labels",
    "stalled",
    "junk",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--initial-peers", required=True)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--honest", required=True, help="an honest stage-0 peer")
    parser.add_argument("--last", required=True, help="an honest last-stage peer")
    parser.add_argument(
        "--trainer", default=None, help="an honest trainer's peer id (forged-header names it)"
    )
    parser.add_argument("--attacks", nargs="*", default=ATTACKS)
    args = parser.parse_args()
    die_with_parent(os.getppid(), grace_s=5.0)  # a killed test run must not leave its attacker behind
    args.trainer = args.trainer or args.last  # any honest peer id serves to forge a header in its name
    attacker = Attacker(args)
    try:
        asyncio.run(attacker.run(args.attacks))
    finally:
        attacker.dht.shutdown()


if __name__ == "__main__":
    main()
