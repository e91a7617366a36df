"""SENTINEL detection: for each attack and magnitude, how many tampered tensors are caught, how fast, and how many
honest tensors are wrongly rejected — on real activations and gradients of the project's model while it trains.

    python experiments/detection/run.py           # full run (~10 min on 2 cores): results.csv, results.md
    python experiments/detection/run.py --quick   # tiny run for the test suite

The same SentinelMonitor and attack code the peers run, with an in-process pipeline instead of the network (the
network adds nothing to what a monitor sees): the default model cut in 2 stages trains on the shipped corpus. Every
micro-batch's activation comes from one of three stage-0 "senders" and its gradient from one of three stage-1
senders (round robin, different phases); the stage-0 peer of a chain receives its gradient, the stage-1 peer its
activation, and a Byzantine receiver's own checks are not counted. One sender is Byzantine from its very first
message, so the monitors warm
up with a third of their traffic tampered. Stage 1's monitor checks activations, stage 0's checks gradients with
the activation they belong to as context. A rejected tensor is not used (the micro-batch is dropped at that point),
an accepted one is, tampered or not, so a missed attack really disturbs training.

False positives are measured on a separate honest run (no attacker) of at least 2,000 checked tensors, and on the
honest traffic of every attack run.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from peers.adversary import Adversary, AttackConfig  # noqa: E402
from swarm.config import DataConfig, ModelConfig  # noqa: E402
from swarm.data import MicroBatchStream, load_token_blocks  # noqa: E402
from swarm.model import StageModule, causal_lm_loss  # noqa: E402
from swarm.sentinel import BACKWARD, FORWARD, SentinelConfig, SentinelMonitor  # noqa: E402

ATTACK_GRID = [  # (attack, magnitude): a strong and a subtle setting each
    ("noise", 1.0),
    ("noise", 0.1),
    ("signflip", 1.0),
    ("signflip", 0.5),
    ("scale", 10.0),
    ("scale", 1.5),
    ("zero", 1.0),
    ("constant", 1.0),
    ("constant", 0.1),
    ("random", 1.0),
    ("replay", 4.0),
    ("replay", 1.0),
    ("alie", 3.0),
    ("alie", 1.0),
]


# from the first message (monitors warm up on partly tampered traffic), or honest for the first third of the run and
# Byzantine afterwards (a "sleeper": the baselines are clean when the attack starts)
SCENARIOS = ("from_start", "sleeper")


@dataclass
class Tally:
    tampered: int = 0
    caught: int = 0
    honest: int = 0
    false_pos: int = 0
    first_tampered_mb: Optional[int] = None
    first_caught_mb: Optional[int] = None
    reasons: Dict[str, int] = field(default_factory=dict)
    fp_reasons: Dict[str, int] = field(default_factory=dict)

    def add(self, mb: int, tampered: bool, accepted: bool, reason: str) -> None:
        if tampered:
            self.tampered += 1
            if self.first_tampered_mb is None:
                self.first_tampered_mb = mb
            if not accepted:
                self.caught += 1
                if self.first_caught_mb is None:
                    self.first_caught_mb = mb
                self.reasons[reason] = self.reasons.get(reason, 0) + 1
        else:
            self.honest += 1
            self.false_pos += not accepted
            if not accepted:
                self.fp_reasons[reason] = self.fp_reasons.get(reason, 0) + 1


class Pipeline:
    """Two stages of the default model training in one process, with monitors at both receivers."""

    def __init__(self, seq_len: int, mb_size: int, lr: float, seed: int = 0):
        torch.manual_seed(seed)
        cfg = ModelConfig()
        self.stages = [StageModule(cfg, s, 2) for s in range(2)]
        self.opts = [torch.optim.AdamW(s.parameters(), lr=lr, betas=(0.9, 0.95)) for s in self.stages]
        self.stream = MicroBatchStream(
            load_token_blocks(DataConfig(seq_len=seq_len, microbatch_size=mb_size)), mb_size, seed=seed
        )
        self.index = 0

    def state(self):
        return [{k: v.clone() for k, v in s.state_dict().items()} for s in self.stages], [
            o.state_dict() for o in self.opts
        ]

    def load(self, state) -> None:
        for s, sd in zip(self.stages, state[0]):
            s.load_state_dict(sd)
        for o, sd in zip(self.opts, state[1]):
            o.load_state_dict(sd)

    def run(
        self,
        num_mb: int,
        monitors: Dict[str, SentinelMonitor],
        attackers: Dict[str, Optional[Adversary]],
        tally: Tally,
        honest_only: bool = False,
    ) -> List[float]:
        losses = []
        for i in range(num_mb):
            ids = self.stream.microbatch(self.index)
            self.index += 1
            sender0, sender1 = f"s0-{i % 3}", f"s1-{(i + 1) % 3}"  # different phases: any pairing occurs
            act = self.stages[0](ids)
            sent = act.detach()
            tampered_fwd = False
            if sender0 == "s0-2" and attackers.get(FORWARD) is not None and not honest_only:
                sent = attackers[FORWARD](sent, FORWARD, {"step": i})
                tampered_fwd = not torch.equal(sent, act.detach())
            # in a real chain the stage-1 peer is the receiver of activations and the stage-0 peer the receiver of
            # gradients: a Byzantine receiver checks nothing, so its checks are not counted
            byz0 = attackers.get(FORWARD) is not None and sender0 == "s0-2" and not honest_only
            byz1 = attackers.get(BACKWARD) is not None and sender1 == "s1-2" and not honest_only
            x1 = sent.clone().requires_grad_(True)
            if not byz1:
                verdict = monitors[FORWARD].check(sent, sender0, FORWARD, microbatch=str(self.index))
                if (
                    verdict.accepted
                ):  # stage 1 is the last stage: its loss is a second, free look at the input
                    loss = causal_lm_loss(self.stages[1](x1), ids)
                    verdict = monitors[FORWARD].check_loss(loss.item(), sender0, microbatch=str(self.index))
                tally.add(i, tampered_fwd, verdict.accepted, verdict.statistic or verdict.baseline)
                if not verdict.accepted:
                    continue
            else:
                loss = causal_lm_loss(self.stages[1](x1), ids)
            loss.backward()
            grad = x1.grad.detach()
            tampered_bwd = False
            if sender1 == "s1-2" and attackers.get(BACKWARD) is not None and not honest_only:
                tampered = attackers[BACKWARD](grad, BACKWARD, {"step": i})
                tampered_bwd = not torch.equal(tampered, grad)
                grad = tampered
            self._step(1)
            accepted = True
            if not byz0:
                verdict = monitors[BACKWARD].check(
                    grad, sender1, BACKWARD, microbatch=str(self.index), context=act.detach()
                )
                tally.add(i, tampered_bwd, verdict.accepted, verdict.statistic or verdict.baseline)
                accepted = verdict.accepted
            if accepted:
                act.backward(grad)
                self._step(0)
            else:
                self.stages[0].zero_grad(set_to_none=True)
            losses.append(loss.item())
        return losses

    def _step(self, stage: int) -> None:
        torch.nn.utils.clip_grad_norm_(self.stages[stage].parameters(), 1.0)
        self.opts[stage].step()
        self.opts[stage].zero_grad(set_to_none=True)


def fresh_monitors(cfg: SentinelConfig) -> Dict[str, SentinelMonitor]:
    return {FORWARD: SentinelMonitor(cfg), BACKWARD: SentinelMonitor(cfg)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=HERE)
    parser.add_argument("--threshold", type=float, default=SentinelConfig().threshold)
    parser.add_argument(
        "--pretrain", type=int, default=150, help="honest micro-batches before any monitor starts"
    )
    parser.add_argument(
        "--honest", type=int, default=1100, help="micro-batches of the honest run (2 tensors each)"
    )
    parser.add_argument("--attack-mb", type=int, default=120, help="micro-batches of each attack run")
    parser.add_argument(
        "--sample-tokens",
        type=int,
        default=SentinelConfig().sample_tokens,
        help="tokens the statistics sample per tensor (the default exceeds this run's 256 tokens: every token); "
        "another value writes results_sample<N>.csv/.md",
    )
    parser.add_argument(
        "--microbatch-size",
        type=int,
        default=4,
        help="sequences of 64 tokens per micro-batch; another value writes results_mb<N>[_sample<N>].csv/.md",
    )
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    seq_len, mb_size, lr = 64, args.microbatch_size, 2e-3
    pretrain, honest_mb, attack_mb = (
        (20, 40, 30) if args.quick else (args.pretrain, args.honest, args.attack_mb)
    )
    grid = ATTACK_GRID[::5] if args.quick else ATTACK_GRID
    # a fixed sample seed: the run is reproducible (peers draw theirs from the OS)
    scfg = SentinelConfig(threshold=args.threshold, sample_tokens=args.sample_tokens, sample_seed=0)
    stem = "results" + (f"_mb{mb_size}" if mb_size != 4 else "")
    if args.sample_tokens != SentinelConfig().sample_tokens:
        stem += f"_sample{args.sample_tokens}"
    started = time.perf_counter()

    pipe = Pipeline(seq_len, mb_size, lr)
    pipe.run(pretrain, fresh_monitors(scfg), {}, Tally(), honest_only=True)  # past the first steep steps
    checkpoint, data_index = pipe.state(), pipe.index

    honest = Tally()
    pipe.run(honest_mb, fresh_monitors(scfg), {}, honest, honest_only=True)
    rows = [
        dict(
            attack="none",
            magnitude="",
            direction="",
            scenario="honest",
            tampered=0,
            caught=0,
            detection_rate="",
            honest=honest.honest,
            false_positives=honest.false_pos,
            fp_rate=honest.false_pos / max(honest.honest, 1),
            mb_to_detect="",
            reasons="",
        )
    ]
    for attack, magnitude in grid:
        for direction, scenario in itertools.product((FORWARD, BACKWARD), SCENARIOS):
            start = 0 if scenario == "from_start" else attack_mb // 3
            pipe.load(checkpoint)
            pipe.index = data_index
            attackers = {
                direction: Adversary(
                    AttackConfig(name=attack, magnitude=magnitude, direction=direction, start_step=start)
                )
            }
            tally = Tally()
            pipe.run(attack_mb, fresh_monitors(scfg), attackers, tally)
            delay = (
                (tally.first_caught_mb - tally.first_tampered_mb)
                if tally.first_caught_mb is not None
                else None
            )
            rows.append(
                dict(
                    attack=attack,
                    magnitude=magnitude,
                    direction=direction,
                    scenario=scenario,
                    tampered=tally.tampered,
                    caught=tally.caught,
                    detection_rate=tally.caught / max(tally.tampered, 1),
                    honest=tally.honest,
                    false_positives=tally.false_pos,
                    fp_rate=tally.false_pos / max(tally.honest, 1),
                    mb_to_detect=delay if delay is not None else "never",
                    reasons=";".join(
                        f"{k}:{v}" for k, v in sorted(tally.reasons.items(), key=lambda kv: -kv[1])
                    ),
                )
            )
            print(
                f"{attack:9s} m={magnitude:<5g} {direction:8s} {scenario:10s} caught {tally.caught}/{tally.tampered} "
                f"first after {rows[-1]['mb_to_detect']} mb, FP {tally.false_pos}/{tally.honest} {tally.fp_reasons}",
                flush=True,
            )

    total_honest = sum(r["honest"] for r in rows)
    total_fp = sum(r["false_positives"] for r in rows)
    print(
        f"honest run: {honest.false_pos} false positives in {honest.honest} honest tensors; "
        f"all runs: {total_fp} in {total_honest} ({100 * total_fp / max(total_honest, 1):.3f}%)"
    )
    print(f"elapsed {time.perf_counter() - started:.0f}s")
    if args.quick:
        print(json.dumps(rows))
        return
    with open(os.path.join(args.out, f"{stem}.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(args.out, f"{stem}.md"), "w") as f:
        f.write(
            f"Threshold {scfg.threshold:g}, warm-up {scfg.warmup}, EMA decay {scfg.ema_decay}, "
            f"statistics on {min(scfg.sample_tokens or seq_len * mb_size, seq_len * mb_size)} of the "
            f"{seq_len * mb_size} tokens of each tensor. "
            f"Honest run: {honest.false_pos} false positives in {honest.honest} honest tensors; all runs: "
            f"{total_fp} in {total_honest} ({100 * total_fp / max(total_honest, 1):.3f}%).\n\n"
        )
        f.write(
            "| attack | magnitude | direction | Byzantine | caught / tampered | detection rate | micro-batches "
            "to first detection | false positives / honest | caught by |\n"
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
        )
        for r in rows[1:]:
            f.write(
                f"| {r['attack']} | {r['magnitude']:g} | {r['direction']} | {r['scenario']} | "
                f"{r['caught']} / {r['tampered']} | "
                f"{100 * r['detection_rate']:.0f}% | {r['mb_to_detect']} | {r['false_positives']} / {r['honest']} | "
                f"{r['reasons']} |\n"
            )


if __name__ == "__main__":
    main()
