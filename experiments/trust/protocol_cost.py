"""What the signed chain protocol (swarm.protocol) costs per micro-batch, against the compute it guards.

Per attempt of a micro-batch through S stages: the trainer signs one header and checks S reports; each hop checks
the header, signs its report and checks the reports of the hops after it; each hop but the last signs a claim on the
activations it sends (a digest of them and a signature: ``swarm.evidence.TensorClaim``), which the next hop checks
against the activations it got (a second digest). Measured here in CPU seconds (process
time) and wall time, interleaved with the forward + backward of one stage of the tiny model on one micro-batch of
the default swarm shape (8 x 128 tokens), repeated; the machine's load is printed beside the figures.

    python experiments/trust/protocol_cost.py            # writes protocol_cost.json beside this file
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

import torch  # noqa: E402
from hivemind.utils.crypto import RSAPrivateKey  # noqa: E402

from swarm.config import model_preset  # noqa: E402
from swarm.evidence import TensorClaim  # noqa: E402
from swarm.identity import peer_id_of  # noqa: E402
from swarm.model import StageModule  # noqa: E402
from swarm.protocol import ChainHeader, HopReport, check_reports, resolve, tensor_digest  # noqa: E402
from swarm.sentinel import FORWARD  # noqa: E402

STAGES, BATCH, SEQ, REPEATS = 2, 8, 128, 30


def protocol_once(keys, ids, tokens, activations) -> None:
    trainer_key, trainer = keys[0], ids[0]
    route = ids[1:]
    header, _ = ChainHeader.create(
        trainer_key,
        run_id="bench",
        trainer=trainer,
        mb="1.0",
        step=0,
        route=route,
        tokens=tokens,
        now=time.time(),
    )
    wire = header.to_wire()
    source = header.labels_digest
    for stage in range(STAGES - 1):  # the forward: each hop's claim on its activations, checked by the next
        claim = TensorClaim.create(
            keys[stage + 1],
            stage=stage,
            direction=FORWARD,
            microbatch=header.digest.hex(),
            epoch=0,
            tensor=activations,
            inputs=(source,),
        ).to_wire()
        received = TensorClaim.from_wire(claim)
        received.verify()
        source = tensor_digest(activations)
        assert received.digest == source
    reports = []
    for stage in reversed(range(STAGES)):  # the reply travels back up: the last hop reports first
        parsed = ChainHeader.from_wire(wire)
        parsed.check(
            run_id="bench",
            stage=stage,
            me=route[stage],
            sender=trainer if stage == 0 else route[stage - 1],
            now=time.time(),
        )
        if reports:
            check_reports(parsed, reports, stage + 1, route[stage + 1])
        last = stage == STAGES - 1
        mine = HopReport.create(
            keys[stage + 1],
            header_digest=parsed.digest,
            stage=stage,
            peer=route[stage],
            ok=True,
            loss=2.0 if last else None,
            epoch=0,
            timings=dict(fwd_s=0.1, bwd_s=0.1, opt_s=0.0, wait_s=0.0, total_s=0.2),
        )
        reports = [mine.to_wire()] + reports
    assert resolve(header, check_reports(header, reports, 0, route[0])).ok


def compute_once(module, x) -> None:
    out = module(x)
    out.float().pow(2).mean().backward()


def measure(fn, *args):
    wall, cpu = time.perf_counter(), time.process_time()
    fn(*args)
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    torch.set_num_threads(1)
    keys = [RSAPrivateKey() for _ in range(STAGES + 1)]
    ids = [peer_id_of(k.get_public_key().to_bytes()) for k in keys]
    tokens = torch.randint(0, 4096, (BATCH, SEQ))
    module = StageModule(model_preset("tiny"), 0, STAGES)
    activations = torch.randn(BATCH, SEQ, model_preset("tiny").hidden_size)
    protocol, compute = [], []
    for _ in range(REPEATS):  # interleaved, so a change in load hits both alike
        protocol.append(measure(protocol_once, keys, ids, tokens, activations))
        compute.append(measure(compute_once, module, tokens))
    result = dict(
        machine=f"{os.cpu_count()} cores, {platform.machine()}",
        load=list(os.getloadavg()),
        stages=STAGES,
        microbatch=[BATCH, SEQ],
        repeats=REPEATS,
        protocol_ms=dict(
            wall=1e3 * statistics.median(w for w, _ in protocol),
            cpu=1e3 * statistics.median(c for _, c in protocol),
        ),
        stage0_fwd_bwd_ms=dict(
            wall=1e3 * statistics.median(w for w, _ in compute),
            cpu=1e3 * statistics.median(c for _, c in compute),
        ),
    )
    result["protocol_over_one_stage_compute"] = (
        result["protocol_ms"]["cpu"] / result["stage0_fwd_bwd_ms"]["cpu"]
    )
    print(json.dumps(result, indent=1))
    with open(os.path.join(HERE, "protocol_cost.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
