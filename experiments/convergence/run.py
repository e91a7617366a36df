"""Convergence under attack: final loss of a swarm with 25% Byzantine peers, defences off and on, against a clean run.

    python experiments/convergence/run.py --local   # full run (~12 min on 2 cores): simulator + one real-process point
    python experiments/convergence/run.py           # the simulator part only
    python experiments/convergence/run.py --local-only   # redo the real-process point, keep the simulator's results
    python experiments/convergence/run.py --quick   # two attacks, short runs, for the test suite (about 75 s on a slow 2-core machine)

For every attack of peers/adversary.py ATTACKS (default magnitude, from the swarm's first micro-batch, direction
``both``) the in-process swarm of experiments/sim/swarm_sim.py (the project's SentinelMonitor, ReputationLedger,
aggregate() and Router on real activations and gradients of the tiny model, AdamW on the shipped corpus) trains
2 stages x 4 replicas with one Byzantine peer in each stage (25%) three ways, same seed and data order:

- ``clean``: no attacker (defences on, as a swarm runs by default): the reference;
- ``off``: attacked, defences off: every received tensor used unchecked (what ``--no-sentinel`` does), no
  audits, no reputation rounds, so no blacklist (the router still bans a peer locally after a failure, as the trainer does,
  but nothing fails);
- ``on``: attacked, defences on: SENTINEL checks at every receiver, ledgers -> signed reports -> ``aggregate`` ->
  blacklist, the router skipping blacklisted and locally banned peers, stage peers refusing blacklisted senders.

A stage-0 attacker can only tamper with activations (forward), the stage-1 attacker (the last stage) only with
gradients (backward). Both stages first train ``--pretrain`` micro-batches as a plain pipeline (no peers, no
checks), so the swarm starts past the first, fastest-drifting phase of training, as a swarm that volunteers join.

Measured per run: the loss of the shared stage weights on a held-out set (``--eval-batches`` micro-batches of the
first epoch that training never reaches) every ``--eval-every`` micro-batches and at the end; the mean training loss
over the last 10% of micro-batches; micro-batches completed / dropped / retried; for each attacker the micro-batch
at which the swarm blacklisted it. The final-loss ratio is the held-out loss at the end over the clean run's (the
training-loss ratio is given too: it includes the losses the last stage computed on tampered activations).

``--local``: one point with real processes (``swarm local``: bootstrap, 2 stages x 2 replicas, trainer, on
127.0.0.1): one Byzantine peer in stage 0 scaling its activations x10 from ``--local-attack-start`` on; clean,
attacked with defences on and attacked with defences off (``--no-sentinel``). The real runs take the shared lock
/tmp/swarm-live.lock themselves (do not wrap this command in flock).
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from typing import List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from experiments.sim.swarm_sim import Byzantine, SimConfig, SwarmSim  # noqa: E402
from peers.adversary import ATTACKS, CHAIN_ATTACKS, DEFAULT_MAGNITUDE  # noqa: E402
from swarm.model import causal_lm_loss  # noqa: E402
from swarm.sentinel import Verdict  # noqa: E402

MODES = ("clean", "off", "on")
BYZANTINE_SLOTS = ((0, 1), (1, 2))  # (stage, replica): one Byzantine peer per stage of 2 x 4
LOCK = "/tmp/swarm-live.lock"


class _Unchecked:
    """Defences off: every tensor is accepted, as a stage server without a SentinelMonitor uses it unchecked."""

    def check(self, x, sender, direction, microbatch="", context=None, step=None, epoch=None) -> Verdict:
        return Verdict(True, sender, direction, 0.0, math.inf, "ok", baseline="off")

    def check_loss(
        self,
        loss,
        sender,
        microbatch="",
        step=None,
        epoch=None,
        activations=None,
        tokens=None,
        attributable=True,
    ) -> Verdict:
        return Verdict(True, sender, "loss", 0.0, math.inf, "ok", baseline="off")


class ConvergenceSim(SwarmSim):
    """The simulator with a defences switch and a held-out loss curve of the shared stage weights."""

    def __init__(
        self,
        cfg: SimConfig,
        defences: bool = True,
        eval_every: int = 40,
        eval_batches: int = 16,
        skip_fraction: float = 0.0,
    ):
        super().__init__(cfg)
        self.defences = defences
        # the control run: a clean swarm that loses a random skip_fraction of its micro-batches (seeded), to show how
        # much the final loss moves under a perturbation that does no harm by itself
        rng = random.Random(cfg.seed + 12345)
        self.skip = {
            cfg.pretrain_microbatches + i for i in range(cfg.microbatches) if rng.random() < skip_fraction
        }
        if not defences:  # no checks, no audits, hivemind's plain weighted mean between a stage's replicas
            for peer in self.peers.values():
                peer.sentinel = _Unchecked()
            self.cfg.audit = None
            self.cfg.averaging = None
        self.eval_every = eval_every
        per_epoch = self.stream.blocks.shape[0] // cfg.microbatch_size
        first = per_epoch - eval_batches  # the end of the first epoch: blocks training never reaches
        if first < cfg.pretrain_microbatches + cfg.microbatches:
            raise ValueError("the held-out micro-batches overlap the training range; use fewer micro-batches")
        self.eval_ids = [self.stream.microbatch(i) for i in range(first, per_epoch)]
        self.curve: List[tuple] = []  # (micro-batches since the swarm started, held-out loss)
        self.train_losses: List[
            tuple
        ] = []  # (micro-batch since the swarm started, training loss) of completed ones

    def _maybe_reputation_round(self) -> None:
        if self.defences:
            super()._maybe_reputation_round()

    def evaluate(self) -> float:
        total = 0.0
        with torch.no_grad():
            for ids in self.eval_ids:
                x = ids
                for module in self.modules:
                    x = module(x)
                total += float(causal_lm_loss(x, ids))
        return total / len(self.eval_ids)

    def run(self) -> dict:
        """``SwarmSim.run``'s loop, with held-out evaluations between optimizer steps (they touch no state)."""
        started = time.perf_counter()
        self.pretrain()
        offset = self.cfg.pretrain_microbatches
        self.curve.append((0, self.evaluate()))
        for index in range(offset, offset + self.cfg.microbatches):
            before = len(self.losses)
            if index in self.skip:
                self._end(index, "dropped", "control: skipped")
            else:
                self.run_microbatch(index)
            if len(self.losses) > before:
                self.train_losses.append((index - offset, self.losses[-1]))
            if (index + 1) % self.cfg.microbatches_per_step == 0:
                self._optimizer_step()
            done = index + 1 - offset
            if done % self.eval_every == 0 or done == self.cfg.microbatches:
                self.curve.append((done, self.evaluate()))
        if self.defences:
            self.last_round = -math.inf
            self._maybe_reputation_round()
        return self.summary(time.perf_counter() - started)


def sim_config(args, attack: Optional[str]) -> SimConfig:
    byz = [Byzantine(stage=s, replica=r, attack=attack) for s, r in BYZANTINE_SLOTS] if attack else []
    return SimConfig(
        stages=2,
        replicas=4,
        byzantine=byz,
        microbatches=args.microbatches,
        microbatch_size=args.microbatch_size,
        seq_len=args.seq_len,
        microbatches_per_step=args.microbatches_per_step,
        seed=args.seed,
        pretrain_microbatches=args.pretrain,
    )


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else math.nan


def sim_run(args, attack: Optional[str], mode: str) -> dict:
    started = time.perf_counter()
    sim = ConvergenceSim(
        sim_config(args, attack),
        defences=mode != "off",
        eval_every=args.eval_every,
        eval_batches=args.eval_batches,
        skip_fraction=args.control_skip if mode == "control" else 0.0,
    )
    r = sim.run()
    tail = max(1, args.microbatches // 10)
    last = [loss for i, loss in sim.train_losses if i >= args.microbatches - tail]
    attackers = r["attackers"]
    row = dict(
        setting="simulator",
        attack=attack or "none",
        magnitude=DEFAULT_MAGNITUDE[attack] if attack else "",
        mode=mode,
        eval_loss=sim.curve[-1][1],
        train_loss_last10=_mean(last),
        completed=r["microbatches"]["completed"],
        dropped=r["microbatches"]["dropped"],
        retried=r["microbatches"]["retried"],
        microbatches=args.microbatches,
    )
    for (s, rep), tag in zip(BYZANTINE_SLOTS, ("fwd", "bwd")):
        a = attackers.get(f"s{s}r{rep}")
        row[f"tampered_{tag}"] = a["tampered"] if a else ""
        row[f"blacklisted_mb_{tag}"] = a["blacklisted_mb"] if a and a["blacklisted_mb"] is not None else ""
        row[f"reason_{tag}"] = (a["reason"] or "") if a else ""
    row.update(
        honest_blacklisted=";".join(r["honest_blacklisted"]),
        detection_rate=_r(r["detection_rate"]),
        false_positive_rate=_r(r["false_positive_rate"]),
        wall_s=round(time.perf_counter() - started, 1),
    )
    row["curve"] = [(i, round(v, 4)) for i, v in sim.curve]
    row["train_curve"] = [(i, round(v, 4)) for i, v in sim.train_losses]
    return row


def _r(x, nd=4):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(x, nd)


def ratios(rows: List[dict]) -> None:
    """Final-loss ratios against the clean run of the same setting."""
    clean = {row["setting"]: row for row in rows if row["mode"] == "clean"}
    for row in rows:
        ref = clean.get(row["setting"])
        for key, out in (("eval_loss", "eval_ratio"), ("train_loss_last10", "train_ratio")):
            v, c = row.get(key), ref.get(key) if ref else None
            ok = isinstance(v, float) and isinstance(c, float) and math.isfinite(c) and c > 0
            row[out] = (round(v / c, 4) if math.isfinite(v) else math.inf) if ok else None


# ---- real processes -----------------------------------------------------------------------------------------------
def local_run(args, mode: str, workdir: str) -> dict:
    """One `swarm local` run (real processes on 127.0.0.1): clean, or 1 Byzantine stage-0 peer with defences on/off."""
    name = f"local-{mode}"
    metrics, summary = os.path.join(workdir, name + ".jsonl"), os.path.join(workdir, name + ".json")
    cmd = [
        sys.executable,
        "-m",
        "peers.cli",
        "local",
        "--stages",
        "2",
        "--replicas",
        str(args.local_replicas),
        "--steps",
        str(args.local_steps),
        "--seq-len",
        str(args.seq_len),
        "--microbatch-size",
        str(args.local_microbatch_size),
        "--target-batch-size",
        str(args.local_microbatch_size * args.local_microbatches_per_step),
        "--seed",
        str(args.seed),
        "--sentinel-warmup-steps",
        str(args.local_attack_start),
        "--metrics-out",
        metrics,
        "--summary-json",
        summary,
        "--workdir",
        os.path.join(workdir, name),
        "--max-inflight",
        "2",
    ]
    if mode != "clean":
        cmd += [
            "--byzantine",
            "1",
            "--attack",
            "scale",
            "--attack-direction",
            "forward",
            "--attack-magnitude",
            "10",
            "--attack-start-step",
            str(args.local_attack_start),
        ]
    if mode == "off":
        cmd += ["--no-sentinel", "--audit-rate", "0"]
    started = time.perf_counter()
    print(f"[real] {mode}: {' '.join(cmd[2:])}", flush=True)
    log = open(os.path.join(workdir, name + ".out"), "w")
    # SIGINT back to its default in the child: a background job of a non-interactive shell inherits it ignored, and
    # `swarm local` stops what it started only on Ctrl-C
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        code = proc.wait(timeout=args.local_timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)  # `swarm local` stops every process it started on Ctrl-C
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise RuntimeError(
            f"swarm local ({mode}) did not finish within {args.local_timeout:.0f}s (log: {log.name})"
        ) from None
    finally:
        log.close()
    if code != 0:
        raise RuntimeError(f"swarm local ({mode}) failed with code {code} (log: {log.name})")
    s = json.load(open(summary))
    steps = [json.loads(line) for line in open(metrics) if line.strip()]
    losses = [m["loss"] for m in steps if m.get("loss") is not None]
    tail = max(1, len(losses) // 10)
    mb = s.get("microbatches", {})
    row = dict(
        setting="real processes",
        attack="scale" if mode != "clean" else "none",
        magnitude=10 if mode != "clean" else "",
        mode=mode,
        eval_loss=None,
        train_loss_last10=_mean(losses[-tail:]),
        loss_last=s.get("loss_last"),
        completed=mb.get("completed"),
        dropped=mb.get("dropped"),
        retried=mb.get("retried"),
        microbatches=(mb.get("completed") or 0) + (mb.get("dropped") or 0),
    )
    byz = [p for p in s.get("peers", []) if p.get("byzantine")]
    row.update(
        tampered_fwd=sum(p.get("tampered") or 0 for p in byz) if byz else "",
        blacklisted_mb_fwd=next(
            (
                p.get("blacklisted_after_microbatches")
                for p in byz
                if p.get("blacklisted_after_microbatches") is not None
            ),
            "",
        ),
        reason_fwd=next((p.get("blacklist_reason") or "" for p in byz if p.get("blacklist_reason")), ""),
        flagged_fwd=sum(p.get("flagged") or 0 for p in byz) if byz else "",
        honest_blacklisted=";".join(
            p["peer_id"][-8:]
            for p in s.get("peers", [])
            if p.get("role") == "stage" and not p.get("byzantine") and p.get("blacklisted")
        ),
        wall_s=round(time.perf_counter() - started, 1),
    )
    row["train_curve"] = [(m["step"], round(m["loss"], 4)) for m in steps if m.get("loss") is not None]
    print(
        f"[real] {mode}: loss last10% {row['train_loss_last10']:.4f}; completed {row['completed']} dropped "
        f"{row['dropped']} retried {row['retried']}; attacker blacklisted after {row['blacklisted_mb_fwd']} "
        f"micro-batches [{row['wall_s']}s]",
        flush=True,
    )
    return row


def local_runs(args) -> List[dict]:
    workdir = tempfile.mkdtemp(prefix="convergence-local-")
    rows = []
    with open(LOCK, "a") as lock:
        print(f"[real] waiting for {LOCK} ...", flush=True)
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            for mode in ("clean", "on", "off"):
                try:
                    rows.append(local_run(args, mode, workdir))
                except RuntimeError as e:
                    print(f"[real] {mode}: FAILED: {e}", flush=True)
                    rows.append(
                        dict(
                            setting="real processes",
                            attack="scale" if mode != "clean" else "none",
                            mode=mode,
                            error=str(e)[:300],
                            train_curve=[],
                        )
                    )
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return rows


# ---- outputs ------------------------------------------------------------------------------------------------------
CSV_FIELDS = (
    "setting",
    "attack",
    "magnitude",
    "mode",
    "eval_loss",
    "eval_ratio",
    "train_loss_last10",
    "train_ratio",
    "microbatches",
    "completed",
    "dropped",
    "retried",
    "tampered_fwd",
    "blacklisted_mb_fwd",
    "reason_fwd",
    "tampered_bwd",
    "blacklisted_mb_bwd",
    "reason_bwd",
    "honest_blacklisted",
    "detection_rate",
    "false_positive_rate",
    "wall_s",
)


def _fmt(v, nd=4) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        return "inf" if math.isinf(v) else ("nan" if math.isnan(v) else f"{v:.{nd}f}")
    return str(v)


def _blk(row, tag) -> str:
    if row.get(f"tampered_{tag}") in ("", None):
        return "-"
    mb = row.get(f"blacklisted_mb_{tag}")
    tampered = f"{row[f'tampered_{tag}']} tampered; "
    if mb in ("", None):
        return tampered + ("never blacklisted" if row["mode"] == "on" else "-")
    return tampered + f"blacklisted at {mb} ({row.get(f'reason_{tag}') or '?'})"


def _verdict(on_ratio) -> str:
    if on_ratio is None:
        return "-"
    return "yes" if on_ratio <= 1.02 else "**no**"


def write_outputs(out_dir: str, rows: List[dict], meta: dict) -> None:
    os.makedirs(out_dir, exist_ok=True)
    ratios(rows)
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow(
                {k: (_fmt(row.get(k)) if isinstance(row.get(k), float) else row.get(k)) for k in CSV_FIELDS}
            )
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1, default=str)
    by = {(r["setting"], r["attack"], r["mode"]): r for r in rows}
    lines = [
        f"Final-loss ratios (attacked / clean), {meta['describe']}.",
        "",
        "Simulator: ratio = held-out loss of the stage weights at the end / the clean run's (training-loss ratio, "
        "last 10% of micro-batches, in brackets). fwd attacker = the stage-0 Byzantine peer (it sends activations), "
        "bwd attacker = the stage-1 one (it sends gradients): tensors it tampered with, and the micro-batch (of "
        "the swarm's run) at which the swarm blacklisted it, with the statistic cited. Within 2% = the defended "
        "run's ratio is at most 1.02.",
        "",
        "| attack | defences off | defences on | within 2%? | on: dropped / retried | on: fwd attacker "
        "| on: bwd attacker | on: honest blacklisted | off: dropped |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    clean = by.get(("simulator", "none", "clean"))
    if clean:
        lines.append(
            f"| none (clean) | - | 1.0000 (1.0000) | yes | {clean['dropped']} / {clean['retried']} | - | - | "
            f"{clean['honest_blacklisted'] or 'none'} | - |"
        )
    control = by.get(("simulator", "none", "control"))
    if control:
        lines.append(
            f"| control: clean, {control['dropped']} random micro-batches skipped | - | "
            f"{_fmt(control['eval_ratio'])} ({_fmt(control['train_ratio'])}) | - | {control['dropped']} / "
            f"{control['retried']} | - | - | {control['honest_blacklisted'] or 'none'} | - |"
        )
    for attack in meta["attacks"]:
        off, on = by.get(("simulator", attack, "off")), by.get(("simulator", attack, "on"))
        if not (off and on):
            continue
        lines.append(
            f"| {attack} x{DEFAULT_MAGNITUDE[attack]:g} | {_fmt(off['eval_ratio'])} ({_fmt(off['train_ratio'])}) | "
            f"{_fmt(on['eval_ratio'])} ({_fmt(on['train_ratio'])}) | {_verdict(on['eval_ratio'])} | "
            f"{on['dropped']} / {on['retried']} | {_blk(on, 'fwd')} | {_blk(on, 'bwd')} | "
            f"{on['honest_blacklisted'] or 'none'} | {off['dropped']} |"
        )
    real = [r for r in rows if r["setting"] == "real processes"]
    if real:
        lines += [
            "",
            f"Real processes (`swarm local`, 2 stages x {meta.get('local_replicas')} replicas, "
            f"{meta.get('local_steps')} optimizer steps from scratch, 1 Byzantine stage-0 peer scaling its "
            f"activations x10 from optimizer step {meta.get('local_attack_start')}): ratio = training loss over the "
            "last 10% of steps / the clean run's. Mode off = `--no-sentinel`.",
            "",
            "| attack | mode | loss (last 10%) | ratio | completed / dropped / retried | attacker blacklisted after "
            "(micro-batches) | tensors rejected | honest blacklisted |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in real:
            if r.get("error"):
                lines.append(
                    f"| {r['attack']} | {r['mode']} | failed: {r['error'][:120]} | - | - | - | - | - |"
                )
                continue
            lines.append(
                f"| {r['attack']} | {r['mode']} | {_fmt(r['train_loss_last10'])} | {_fmt(r['train_ratio'])} | "
                f"{r['completed']} / {r['dropped']} / {r['retried']} | {_fmt(r.get('blacklisted_mb_fwd'))} | "
                f"{_fmt(r.get('flagged_fwd'))} | {r['honest_blacklisted'] or 'none'} |"
            )
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(out_dir, rows, meta)


def plot(out_dir: str, rows: List[dict], meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sim = {(r["attack"], r["mode"]): r for r in rows if r["setting"] == "simulator"}
    attacks = list(meta["attacks"])
    real = [r for r in rows if r["setting"] == "real processes"]
    panels = attacks + (["real"] if real else [])
    cols = min(4, len(panels)) or 1
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.2 * nrows), squeeze=False)
    colors = {"clean": "black", "off": "tab:red", "on": "tab:blue"}
    labels = {"clean": "clean", "off": "attacked, defences off", "on": "attacked, defences on"}
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, name in zip(axes.flat, panels):
        if name == "real":
            for r in real:
                xs, ys = zip(*r["train_curve"]) if r["train_curve"] else ((), ())
                ax.plot(xs, ys, color=colors[r["mode"]], label=labels[r["mode"]], lw=1.2)
            ax.set_title(
                f"real processes: scale x10 fwd (2x{meta.get('local_replicas')}, 1 Byzantine)", fontsize=9
            )
            ax.set_xlabel("optimizer step")
            ax.set_ylabel("training loss")
            ax.legend(fontsize=7)
            continue
        for mode in MODES:
            r = sim.get(("none", "clean") if mode == "clean" else (name, mode))
            if not r:
                continue
            xs, ys = zip(*r["curve"])
            ax.plot(xs, ys, color=colors[mode], label=labels[mode], lw=1.2)
        control = sim.get(("none", "control"))
        if control:
            xs, ys = zip(*control["curve"])
            ax.plot(
                xs, ys, color="grey", ls=":", lw=1.0, label=f"control: clean, {control['dropped']} mb skipped"
            )
        off, on = sim.get((name, "off")), sim.get((name, "on"))
        ax.set_title(
            f"{name} x{DEFAULT_MAGNITUDE[name]:g}: off {_fmt(off and off.get('eval_ratio'), 3)}, "
            f"on {_fmt(on and on.get('eval_ratio'), 3)}",
            fontsize=9,
        )
        ax.set_xlabel("micro-batches (swarm)")
        ax.set_ylabel("held-out loss")
        ys_clean = [y for _, y in sim[("none", "clean")]["curve"]] if ("none", "clean") in sim else []
        if ys_clean:  # keep the interesting range visible even when the undefended run diverges
            lo = min(ys_clean) - 0.2
            hi = max(
                max(ys_clean) + 0.5,
                max((y for m in ("on",) if sim.get((name, m)) for _, y in sim[(name, m)]["curve"]), default=0)
                + 0.2,
            )
            ax.set_ylim(lo, min(hi + 1.0, lo + 6))
        ax.legend(fontsize=7)
    fig.suptitle(meta["describe"], fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "results.png"), dpi=90)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="two attacks, short runs (for the test suite)")
    p.add_argument("--local", action="store_true", help="also run the real-process point (swarm local)")
    p.add_argument(
        "--local-only",
        action="store_true",
        help="only the real-process point; keep the simulator rows from OUT_DIR/summary.json",
    )
    p.add_argument(
        "--report-only", action="store_true", help="only rewrite the tables and the plot from the saved rows"
    )
    p.add_argument("--out-dir", default=HERE)
    p.add_argument(
        "--attacks",
        nargs="*",
        default=list(CHAIN_ATTACKS),
        help="attacks of peers/adversary.py (default: the chain attacks; the averaging ones, avg-*, are "
        "run into their own folder: see the README)",
    )
    p.add_argument("--microbatches", type=int, default=480, help="micro-batches per swarm run")
    p.add_argument(
        "--pretrain", type=int, default=400, help="plain-pipeline micro-batches before the swarm starts"
    )
    p.add_argument("--microbatch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--microbatches-per-step", type=int, default=8)
    p.add_argument("--eval-every", type=int, default=40)
    p.add_argument("--eval-batches", type=int, default=48)
    p.add_argument(
        "--control-skip",
        type=float,
        default=0.02,
        help="the control run: a clean run that skips this fraction of micro-batches (0: no control run)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--local-steps", type=int, default=40)
    p.add_argument("--local-microbatch-size", type=int, default=4)
    p.add_argument("--local-microbatches-per-step", type=int, default=4)
    p.add_argument("--local-attack-start", type=int, default=8)
    p.add_argument(
        "--local-replicas",
        type=int,
        default=3,
        help="replicas per stage of the real run (with 2, the one Byzantine peer is half its stage's senders)",
    )
    p.add_argument("--local-timeout", type=float, default=420)
    args = p.parse_args(argv)
    if args.quick:
        args.attacks = ["zero", "signflip"]
        args.microbatches, args.pretrain, args.eval_every, args.eval_batches, args.control_skip = (
            120,
            80,
            40,
            8,
            0.0,
        )
    unknown = [a for a in args.attacks if a not in ATTACKS]
    if unknown:
        p.error(f"unknown attack(s) {', '.join(unknown)}; known: {', '.join(ATTACKS)}")
    describe = (
        f"tiny model (4 layers x 192), 2 stages x 4 replicas, 1 Byzantine per stage (25%), seq {args.seq_len}, "
        f"micro-batch {args.microbatch_size}, {args.microbatches_per_step} micro-batches/step, "
        f"{args.pretrain} pretrain + {args.microbatches} swarm micro-batches, seed {args.seed}"
    )
    meta = dict(
        describe=describe, attacks=args.attacks, args=vars(args), local_attack_start=args.local_attack_start
    )
    started = time.perf_counter()
    os.makedirs(args.out_dir, exist_ok=True)
    sim_path, local_path = (os.path.join(args.out_dir, n) for n in ("sim_rows.json", "local_rows.json"))
    if not (args.local_only or args.report_only):
        rows = []
        runs = [(None, "clean")] + ([(None, "control")] if args.control_skip > 0 else [])
        for attack, mode in runs + [(a, m) for a in args.attacks for m in ("off", "on")]:
            row = sim_run(args, attack, mode)
            rows.append(row)
            print(
                f"[sim] {row['attack']:9s} {mode:5s}: held-out {row['eval_loss']:.4f} train(last10%) "
                f"{row['train_loss_last10']:.4f}; completed {row['completed']} dropped {row['dropped']} retried "
                f"{row['retried']}; blacklisted at fwd {row['blacklisted_mb_fwd']!r} bwd {row['blacklisted_mb_bwd']!r}; "
                f"honest blacklisted {row['honest_blacklisted'] or 'none'} [{row['wall_s']}s]",
                flush=True,
            )
        meta["sim_wall_s"] = round(time.perf_counter() - started, 1)
        with open(sim_path, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, default=str)
    if args.local or args.local_only:
        t = time.perf_counter()
        local = local_runs(args)
        with open(local_path, "w") as f:
            json.dump(
                dict(meta=dict(local_wall_s=round(time.perf_counter() - t, 1)), rows=local), f, default=str
            )
    rows = []
    if os.path.exists(sim_path):
        saved = json.load(open(sim_path))
        meta, rows = saved["meta"], saved["rows"]
    if os.path.exists(local_path):
        local = json.load(open(local_path))
        rows += local["rows"]
        meta.update(
            local["meta"],
            local_replicas=args.local_replicas,
            local_attack_start=args.local_attack_start,
            local_steps=args.local_steps,
        )
    write_outputs(args.out_dir, rows, meta)
    print(open(os.path.join(args.out_dir, "results.md")).read())
    print(f"done in {round(time.perf_counter() - started, 1)}s; outputs in {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
