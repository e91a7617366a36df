"""How far apart two honest replicas' recomputations of the same hop are, when their weights are 0, 1 or 2 optimizer
steps apart: the tolerance an audit needs (``swarm.evidence.AuditTolerance``), measured rather than guessed.

    python experiments/audits/tolerance.py            # writes tolerance.json here

The swarm of the simulator (tiny model, 4 stages, 400 micro-batches of plain pipeline pretraining, then 60 steps of
8 micro-batches, AdamW lr 2e-3): after every step, for 2 fresh micro-batches, every stage's forward output and input
gradient are computed with the current weights and with the weights 1 and 2 steps before, from the same inputs.
The figure is ``relative_error`` (``||a - b|| / ||b||``). Beside it, the same error for the attacks of the suite at
small magnitudes, so the margin is visible.
"""

from __future__ import annotations

import copy
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from experiments.sim.swarm_sim import SimConfig, SwarmSim  # noqa: E402
from peers.adversary import tamper  # noqa: E402
from swarm.evidence import recompute, relative_error  # noqa: E402
from swarm.model import causal_lm_loss  # noqa: E402
from swarm.sentinel import BACKWARD, FORWARD  # noqa: E402


def main() -> None:
    cfg = SimConfig(stages=4, replicas=1, pretrain_microbatches=400, microbatches=1)
    sim = SwarmSim(cfg)
    sim.pretrain()
    history = []  # module copies, newest last
    errors = {lag: {FORWARD: [], BACKWARD: []} for lag in (0, 1, 2)}
    by_stage = {lag: {k: [] for k in range(cfg.stages)} for lag in (1, 2)}
    attacks = {
        f"{name} x{m}": []
        for name, m in [
            ("noise", 0.02),
            ("noise", 0.05),
            ("noise", 0.1),
            ("alie", 0.1),
            ("scale", 1.05),
            ("scale", 1.1),
            ("signflip", 1.0),
        ]
    }
    gen = torch.Generator().manual_seed(0)
    index = cfg.pretrain_microbatches
    for _ in range(60):
        history.append([copy.deepcopy(m) for m in sim.modules])
        history = history[-3:]
        for _ in range(cfg.microbatches_per_step):
            ids = sim.stream.microbatch(index)
            index += 1
            x = ids
            outs = []
            for m in sim.modules:
                x = m(x)
                outs.append(x)
            loss = causal_lm_loss(x, ids)
            loss.backward()
            sim.accumulated = [1] * cfg.stages
        # after the step's backward: probe hops with the current weights vs the lagged ones
        probe_ids = sim.stream.microbatch(index + 10_000)
        x = probe_ids
        inputs = []
        for m in sim.modules:
            inputs.append(x.detach())
            with torch.no_grad():
                x = m(x)
        g_out = None
        grads_out = [None] * cfg.stages
        for k in range(cfg.stages - 1, -1, -1):  # output-gradients, computed once with the current weights
            grads_out[k] = g_out
            if k > 0:
                _, g_out = recompute(sim.modules[k], BACKWARD, inputs[k], g_out, probe_ids)
        for k in range(cfg.stages):
            cur_f, cur_b = recompute(sim.modules[k], BACKWARD, inputs[k], grads_out[k], probe_ids)
            # lag 0: the same weights, recomputed with another number of threads (another reduction order)
            torch.set_num_threads(2)
            f0, b0 = recompute(sim.modules[k], BACKWARD, inputs[k], grads_out[k], probe_ids)
            torch.set_num_threads(1)
            if k < cfg.stages - 1:
                errors[0][FORWARD].append(relative_error(cur_f, f0))
            if k > 0:
                errors[0][BACKWARD].append(relative_error(cur_b, b0))
            for lag in (1, 2):
                if len(history) > lag:
                    by_stage[lag][k].append(0.0)
                    old = history[-1 - lag][k]
                    f, b = recompute(old, BACKWARD, inputs[k], grads_out[k], probe_ids)
                    if k < cfg.stages - 1:  # the last stage sends no activations
                        errors[lag][FORWARD].append(relative_error(cur_f, f))
                        by_stage[lag][k][-1] = max(by_stage[lag][k][-1], errors[lag][FORWARD][-1])
                    if k > 0:
                        errors[lag][BACKWARD].append(relative_error(cur_b, b))
                        by_stage[lag][k][-1] = max(by_stage[lag][k][-1], errors[lag][BACKWARD][-1])
            for name in attacks:
                what, m = name.split(" x")
                for t in ([cur_f] if k < cfg.stages - 1 else []) + ([cur_b] if k > 0 else []):
                    attacks[name].append(relative_error(tamper(t, what, float(m), gen), t))
        sim._optimizer_step()

    def q(values, p):
        s = sorted(values)
        return s[min(len(s) - 1, int(p * len(s)))]

    out = {
        "lag": {
            str(lag): {d: dict(n=len(v), median=q(v, 0.5), p99=q(v, 0.99), max=max(v)) for d, v in e.items()}
            for lag, e in errors.items()
        },
        "max_by_stage": {
            str(lag): {str(k): max(v) for k, v in e.items() if v} for lag, e in by_stage.items()
        },
        "attacks_min": {name: min(v) for name, v in attacks.items()},
    }
    print(json.dumps(out, indent=1))
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tolerance.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
