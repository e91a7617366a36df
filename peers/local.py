"""`swarm local`: a whole swarm as separate OS processes on 127.0.0.1 (bootstrap, stage peers, trainer).

:class:`LocalSwarm` starts and stops the processes; tests and experiments use it too. Each child's stdout is
read by a thread (so a chatty child never blocks) and scanned for ``SWARM <kind> {json}`` lines; everything
a child prints goes to a log file in the work directory.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from peers.common import PARENT_PID_ENV, fail
from peers.config_file import ENV_PREFIX


@dataclass
class Child:
    """One child process and what it announced."""

    name: str
    role: str
    proc: subprocess.Popen
    log_path: str
    stage: Optional[int] = None
    events: "queue.Queue[tuple]" = field(default_factory=queue.Queue)
    info: Dict[str, Any] = field(default_factory=dict)
    pump: Optional[threading.Thread] = None

    def wait_event(self, kind: str, timeout: float) -> Dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"{self.name} did not report '{kind}' within {timeout:.0f}s (log: {self.log_path})"
                )
            try:
                got_kind, payload = self.events.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"{self.name} exited with code {self.proc.returncode} (log: {self.log_path})"
                    ) from None
                continue
            if got_kind == kind:
                self.info.update(payload)
                return payload


def _pump(child: Child, stream, log_file) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace")
        log_file.write(line)
        log_file.flush()
        if line.startswith("SWARM "):
            parts = line.rstrip("\n").split(" ", 2)
            if len(parts) == 3:
                try:
                    child.events.put((parts[1], json.loads(parts[2])))
                except json.JSONDecodeError:
                    pass
    stream.close()


class LocalSwarm:
    """Starts roles as processes of ``python -m peers.cli``; ``stop()`` (or the context manager) ends them all."""

    def __init__(
        self, workdir: Optional[str] = None, run_id: str = "swarm", env: Optional[Dict[str, str]] = None
    ):
        self.workdir = workdir or tempfile.mkdtemp(prefix="swarm-local-")
        os.makedirs(self.workdir, exist_ok=True)
        self.run_id = run_id
        self.authority_key: Optional[str] = None  # set: every child gets an identity and an allowlist token
        self.children: List[Child] = []
        self.initial_peers: List[str] = []
        # the children get every setting as a flag: SWARM_* variables meant for this command must not reach them
        # (SWARM_ATTACK would make every peer an attacker); SWARM_PARENT_PID makes them leave when this one dies
        inherited = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
        self.env = dict(inherited, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env or {}))
        self.env[PARENT_PID_ENV] = str(os.getpid())

    def spawn(
        self,
        name: str,
        role: str,
        args: Sequence[str],
        stage: Optional[int] = None,
        stderr_to_console: bool = False,
    ) -> Child:
        log_path = os.path.join(self.workdir, f"{name}.log")
        log_file = open(log_path, "a")
        cmd = [sys.executable, "-m", "peers.cli", *args, "--debug"]  # tracebacks go to the child's log file
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=None if stderr_to_console else log_file,
            env=self.env,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        child = Child(name, role, proc, log_path, stage)
        child.pump = threading.Thread(target=_pump, args=(child, proc.stdout, log_file), daemon=True)
        child.pump.start()
        self.children.append(child)
        return child

    def start_dht(self, shape_args: Sequence[str] = (), timeout: float = 60.0) -> Child:
        child = self.spawn(
            "dht", "bootstrap", ["dht", "--run-id", self.run_id, "--threads", "1", *shape_args]
        )
        self.initial_peers = child.wait_event("dht", timeout)["initial_peers"]
        return child

    def start_stage(
        self,
        stage: int,
        name: Optional[str] = None,
        extra: Sequence[str] = (),
        wait: bool = True,
        timeout: float = 120.0,
    ) -> Child:
        name = name or f"stage{stage}.{sum(c.stage == stage for c in self.children if c.role == 'stage')}"
        child = self.spawn(
            name,
            "stage",
            [
                "serve",
                "--run-id",
                self.run_id,
                "--initial-peers",
                *self.initial_peers,
                "--stage",
                str(stage),
                "--threads",
                "1",
                *self.admission_args(name),
                *extra,
            ],
            stage=stage,
        )
        if wait:
            child.wait_event("serve", timeout)
        return child

    def start_trainer(self, extra: Sequence[str] = (), stderr_to_console: bool = False) -> Child:
        return self.spawn(
            "trainer",
            "trainer",
            [
                "train",
                "--run-id",
                self.run_id,
                "--initial-peers",
                *self.initial_peers,
                "--threads",
                "1",
                *self.admission_args("trainer"),
                *extra,
            ],
            stderr_to_console=stderr_to_console,
        )

    def admission_args(self, name: str) -> List[str]:
        """With an allowlist (``self.authority_key``): a fresh identity file for the child and its signed token."""
        if not self.authority_key:
            return []
        from hivemind.p2p import P2P, PeerID

        from swarm.admission import issue_token, load_or_create_authority_key

        os.makedirs(os.path.join(self.workdir, "identities"), exist_ok=True)
        path = os.path.join(self.workdir, "identities", f"{name}.key")
        if not os.path.exists(path):
            P2P.generate_identity(path)
        with open(path, "rb") as f:
            peer_id = PeerID.from_identity(f.read()).to_base58()
        token = issue_token(load_or_create_authority_key(self.authority_key), self.run_id, peer_id)
        return ["--identity", path, "--admission-token", token]

    def kill(self, child: Child, sig: int = signal.SIGKILL) -> None:
        if child.proc.poll() is None:
            os.killpg(child.proc.pid, sig)  # the whole group: the peer and its DHT / p2pd children

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM every child (a clean leave: it announces itself offline), then SIGKILL what is left.

        Only the role's own process gets SIGTERM: its DHT process and p2p daemon must outlive its goodbye.
        A Ctrl-C while it waits (an impatient second one) skips the wait: everything is killed at once.
        """
        try:
            self._stop(grace_s)
        except KeyboardInterrupt:
            self._stop(0.0)

    def _stop(self, grace_s: float) -> None:
        for child in reversed(self.children):
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for child in self.children:
            try:
                child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for child in self.children:
            try:
                os.killpg(child.proc.pid, signal.SIGKILL)  # also reaps orphaned p2pd / DHT processes
            except (ProcessLookupError, PermissionError):
                pass
            try:
                child.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for child in self.children:
            if child.pump is not None:
                child.pump.join(timeout=5)  # everything the child printed (its ledger line) has been read

    def __enter__(self) -> "LocalSwarm":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def ledgers(self) -> Dict[str, Dict[str, Any]]:
        """The ``ledger`` line each stage peer printed as it left (what it rejected from whom)."""
        out = {}
        for child in self.children:
            while not child.events.empty():
                kind, payload = child.events.get_nowait()
                if kind == "ledger":
                    child.info["ledger"] = payload
            if "ledger" in child.info:
                out[child.info["peer_id"]] = child.info["ledger"]
        return out

    def peer_infos(self, peers: Sequence[str], timeout: float = 60.0) -> Dict[str, Any]:
        """Each peer's ``rpc_info`` (epoch, parameter checksum, stats...), asked over the swarm's DHT as a client."""
        import asyncio

        from swarm import aio
        from swarm.network import create_dht
        from swarm.stage_client import fetch_peer_info

        dht = create_dht(self.run_id, self.initial_peers, client_mode=True)
        try:

            async def query():
                p2p = await dht.replicate_p2p()
                return {peer: await fetch_peer_info(p2p, self.run_id, peer) for peer in peers}

            return aio.run(asyncio.wait_for(query(), timeout))
        finally:
            dht.shutdown()

    def peers_summary(self) -> List[Dict[str, Any]]:
        ledgers = self.ledgers()
        flagged: Dict[str, int] = {}  # tensors rejected
        strikes: Dict[
            str, int
        ] = {}  # ... of which evidence against the sender (reputation), see Verdict.evidence
        for ledger in ledgers.values():
            for peer, count in ledger.get("rejected", {}).items():
                flagged[peer] = flagged.get(peer, 0) + int(count)
            for peer, tally in ledger.get("tallies", {}).items():
                strikes[peer] = strikes.get(peer, 0) + int(tally.get("strikes", 0))
        peers = []
        for child in self.children:
            if child.role == "stage":
                peer_id = child.info.get("peer_id")
                peers.append(
                    dict(
                        peer_id=peer_id,
                        stage=child.stage,
                        role="stage",
                        name=child.name,
                        byzantine=bool(child.info.get("byzantine", False)),
                        flagged=flagged.get(peer_id, 0),
                        strikes=strikes.get(peer_id, 0),
                        tampered=ledgers.get(peer_id, {}).get("tampered"),
                        audits=ledgers.get(peer_id, {}).get("audits"),
                        dataplane=ledgers.get(peer_id, {}).get("dataplane"),
                        exit_code=child.proc.poll(),
                    )
                )
            elif child.role == "bootstrap":
                peers.append(
                    dict(
                        peer_id=child.info.get("peer_id"),
                        stage=None,
                        role="bootstrap",
                        name=child.name,
                        exit_code=child.proc.poll(),
                    )
                )
        return peers


def shape_args(args) -> List[str]:
    return (
        [
            "--stages",
            str(args.stages),
            "--model",
            args.model,
            "--seq-len",
            str(args.seq_len),
            "--microbatch-size",
            str(args.microbatch_size),
            "--target-batch-size",
            str(args.target_batch_size),
            "--lr",
            str(args.lr),
            "--seed",
            str(args.seed),
            "--probation-s",
            str(args.probation_s),
            "--probation-work",
            str(args.probation_work),
            "--min-reporters",
            str(args.min_reporters),
            "--report-period",
            str(args.report_period),
            "--pow-bits",
            str(args.pow_bits),
            "--aggregator",
            args.aggregator,
            "--clip-radius",
            str(args.clip_radius),
            "--clip-iters",
            str(args.clip_iters),
        ]
        + (["--authority-key", os.path.abspath(args.authority_key)] if args.authority_key else [])
        + (["--tokenizer", os.path.abspath(args.tokenizer)] if args.tokenizer else [])
    )


def training_args(args, metrics_out: str, summary_json: str) -> List[str]:
    extra = [
        "--steps",
        str(args.steps),
        "--max-inflight",
        str(args.max_inflight),
        "--max-attempts",
        str(args.max_attempts),
        "--audit-rate",
        str(args.audit_rate),
        "--metrics-out",
        metrics_out,
        "--summary-json",
        summary_json,
        "--compression",
        args.compression,
        "--text-field",
        args.text_field,
    ]
    if args.data:
        extra += ["--data", *args.data]
    if args.tokenizer:
        extra += ["--tokenizer", args.tokenizer]
    if args.tensorboard:
        extra += ["--tensorboard", os.path.abspath(args.tensorboard)]
    if args.no_dataplane:
        extra.append("--no-dataplane")
    return extra


def merge_summary(trainer_summary: Dict[str, Any], launched: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The trainer's summary with every launched process in ``peers`` (plus the trainer's view of each)."""
    seen = {p["peer_id"]: p for p in trainer_summary.get("peers", []) if p.get("peer_id")}
    peers = []
    for entry in launched:
        merged = dict(entry)
        view = seen.pop(entry["peer_id"], None) if entry.get("peer_id") else None
        if view:
            merged.update({k: v for k, v in view.items() if k not in merged or merged[k] is None})
        peers.append(merged)
    peers.extend(seen.values())  # the trainer, and any peer that joined from outside
    return dict(trainer_summary, peers=peers)


def save_loss_plot(metrics_path: str, png_path: str) -> Optional[str]:
    """Plot loss against step from a metrics file; returns the PNG path, or None if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [json.loads(line) for line in open(metrics_path) if line.strip()]
    rows = [r for r in rows if r.get("loss") is not None]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], marker=".")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("swarm local: loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


def byzantine_slots(stages: int, replicas: int, count: int) -> set:
    """Which (stage, replica) slots are Byzantine: spread over stages, last replicas first."""
    slots = [(i % stages, replicas - 1 - i // stages) for i in range(count)]
    return set(slots)


def stage_args(args, byzantine: bool) -> List[str]:
    extra = [
        "--sentinel-threshold",
        str(args.sentinel_threshold),
        "--sentinel-warmup",
        str(args.sentinel_warmup),
        "--sentinel-warmup-steps",
        str(args.sentinel_warmup_steps),
        "--recompute-rate",
        str(args.recompute_rate),
    ]
    if args.no_sentinel:
        extra.append("--no-sentinel")
    if args.no_dataplane:
        extra.append("--no-dataplane")
    if byzantine:
        extra += [
            "--attack",
            args.attack,
            "--attack-direction",
            args.attack_direction,
            "--attack-magnitude",
            str(args.attack_magnitude),
            "--attack-probability",
            str(args.attack_probability),
            "--attack-start-step",
            str(args.attack_start_step),
        ]
    return extra


def run(args) -> int:
    if args.stages < 1 or args.replicas < 1:
        return fail("--stages and --replicas must be >= 1")
    if args.byzantine and not args.attack:
        return fail("--byzantine K needs --attack NAME")
    if not 0 <= args.byzantine < args.stages * args.replicas:
        return fail("--byzantine must leave at least one honest stage peer")
    from peers.dht_peer import swarm_record
    from peers.trainer_peer import check_data_args

    check_data_args(args)
    checkpoints = os.path.abspath(args.checkpoint_dir) if args.checkpoint_dir else None
    args.resume_from = None
    try:  # what the bootstrap peer would publish: a bad model or cut fails here, not in a child's log
        if checkpoints is not None:
            from swarm.checkpoint import parse_every

            parse_every(args.checkpoint_every)
            if any(Path(checkpoints).rglob("stage*of*.safetensors")):
                args.resume_from = checkpoints  # a second run with the same directory continues the first
        swarm_record(args)  # (resuming: takes the checkpoints' model and number of stages)
    except ValueError as e:
        return fail(str(e))
    swarm = LocalSwarm(args.workdir, run_id=args.run_id)
    if args.authority_key:
        from swarm.admission import load_or_create_authority_key

        swarm.authority_key = os.path.abspath(args.authority_key)
        load_or_create_authority_key(swarm.authority_key)
    metrics_out = args.metrics_out or os.path.join(swarm.workdir, "metrics.jsonl")
    summary_json = args.summary_json or os.path.join(swarm.workdir, "summary.json")
    started = time.monotonic()

    def terminated(signum, frame):  # SIGTERM (a supervisor, `kill`) stops the children too, as Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminated)
    try:
        resume = ["--resume-from", args.resume_from] if args.resume_from else []
        swarm.start_dht(shape_args(args) + resume, timeout=args.startup_timeout)
        if args.resume_from:
            print(f"swarm local: resuming from the checkpoints in {checkpoints}", flush=True)
        print(f"swarm local: bootstrap address: {swarm.initial_peers[0]}", flush=True)
        print(f"swarm local: logs in {swarm.workdir}", flush=True)
        byzantine = byzantine_slots(args.stages, args.replicas, args.byzantine)
        stages = [
            swarm.start_stage(
                s,
                wait=False,
                extra=stage_args(args, (s, r) in byzantine)
                + (
                    ["--checkpoint-dir", os.path.join(checkpoints, f"stage{s}-{r}")]
                    + ["--checkpoint-every", args.checkpoint_every]
                    if checkpoints
                    else []
                ),
            )
            for s in range(args.stages)
            for r in range(args.replicas)
        ]
        print(
            f"swarm local: starting {len(stages)} stage peers (each joins the DHT, builds its stage and loads "
            f"its state; about a minute on a small machine)",
            flush=True,
        )
        for up, child in enumerate(stages, 1):
            child.wait_event("serve", args.startup_timeout)
            print(
                f"swarm local: {child.name} serving stage {child.stage} ({up}/{len(stages)} up, "
                f"{time.monotonic() - started:.0f}s)",
                flush=True,
            )
        print(
            f"swarm local: {len(stages)} stage peers up after {time.monotonic() - started:.1f}s; training "
            f"{args.steps} steps",
            flush=True,
        )
        trainer = swarm.start_trainer(training_args(args, metrics_out, summary_json), stderr_to_console=True)
        code = trainer.proc.wait()
        if code != 0:
            return fail(f"trainer exited with code {code} (log: {trainer.log_path})")
        with open(summary_json) as f:
            trainer_summary = json.load(f)
        exported = export_model(swarm, args) if args.export else None
    except (TimeoutError, RuntimeError) as e:
        return fail(str(e))
    except KeyboardInterrupt:
        return fail("interrupted")
    finally:
        swarm.stop()
    summary = merge_summary(trainer_summary, swarm.peers_summary())  # after stop(): exit codes are known
    if exported is not None:
        summary["export"] = exported
    with open(summary_json, "w") as f:
        json.dump(summary, f, indent=2)
    plot = save_loss_plot(metrics_out, os.path.splitext(metrics_out)[0] + ".png")
    mb = summary["microbatches"]
    print(
        f"swarm local: {summary['steps']} steps, loss {summary['loss_first']:.4f} -> {summary['loss_last']:.4f}, "
        f"{summary['tokens_per_s']:.0f} tokens/s; micro-batches completed {mb['completed']}, retried {mb['retried']}, "
        f"dropped {mb['dropped']}",
        flush=True,
    )
    print(
        f"swarm local: summary {summary_json}, metrics {metrics_out}" + (f", plot {plot}" if plot else ""),
        flush=True,
    )
    if exported is not None:
        print(
            f"swarm local: model exported to {exported['out']} (step {exported['step']}); load it with "
            f"transformers.AutoModelForCausalLM.from_pretrained({exported['out']!r})",
            flush=True,
        )
    if checkpoints:
        print(
            f"swarm local: checkpoints in {checkpoints} (run again with the same --checkpoint-dir to resume)"
        )
    return 0


def export_model(swarm: "LocalSwarm", args, timeout: float = 600.0) -> Dict[str, Any]:
    """Run `swarm export` against the local swarm while its peers still serve; its ``exported`` event."""
    cmd = ["export", "--run-id", swarm.run_id, "--initial-peers", *swarm.initial_peers]
    cmd += ["--out", os.path.abspath(args.export), "--overwrite", "--threads", "1"]
    if args.tokenizer:
        cmd += ["--tokenizer", os.path.abspath(args.tokenizer)]
    if args.data:
        cmd += ["--eval-data", *[os.path.abspath(d) for d in args.data]]
    print(f"swarm local: exporting the model to {args.export}", flush=True)
    child = swarm.spawn("export", "export", cmd, stderr_to_console=True)
    event = child.wait_event("exported", timeout)
    child.proc.wait(timeout=60)
    return event
