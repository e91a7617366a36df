"""`swarm`: the command line. Each subcommand parses flags, builds configs and calls the library or a role.

    swarm dht     bootstrap peer; creates the swarm (publishes its config) and prints the address to join
    swarm serve   a stage peer:  swarm serve --initial-peers ADDR --stage N
    swarm train   the trainer:   swarm train --initial-peers ADDR --steps N
    swarm status  what a swarm is doing:  swarm status --initial-peers ADDR [--json] [--watch]
    swarm local   a whole swarm of separate processes on 127.0.0.1, trained and stopped
    swarm tokenizer  train a byte-level BPE tokenizer on your own files

Every flag can also come from a config file (``--config FILE``) or an environment variable named after it
(``SWARM_INITIAL_PEERS`` for ``--initial-peers``): flags win over the environment, which wins over the file.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from typing import List, Optional

from peers.common import PARENT_PID_ENV
from peers.config_file import (
    ConfigFileError,
    add_config_flag_everywhere,
    apply_config_file,
    apply_environment,
)

DEFAULT_RUN_ID = "swarm"


def _common(parser: argparse.ArgumentParser, initial_peers: bool = True) -> None:
    group = parser.add_argument_group("network")
    if initial_peers:
        group.add_argument(
            "--initial-peers",
            nargs="+",
            required=True,
            metavar="ADDR",
            help="multiaddr(s) of the swarm's creator, as printed by `swarm dht` (its /p2p/ peer id "
            "pins whose swarm config is read), and of any other peers already in the swarm",
        )
    group.add_argument("--run-id", default=DEFAULT_RUN_ID, help="the swarm's name (default: %(default)s)")
    group.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: %(default)s)")
    group.add_argument("--port", type=int, default=0, help="TCP port to listen on; 0 picks a free one")
    group.add_argument(
        "--identity",
        default=None,
        metavar="PATH",
        help="file holding this peer's libp2p key (it also signs this peer's DHT records); created "
        "if missing, so restarts keep the peer id",
    )
    group.add_argument("--threads", type=int, default=None, help="torch CPU threads for this process")
    group.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def _swarm_shape(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("swarm config (published by the swarm's creator; joiners read it)")
    group.add_argument("--stages", type=int, default=2, help="pipeline stages (default: %(default)s)")
    group.add_argument(
        "--model", default="tiny", help="model preset: tiny, small, llama-1b (default: %(default)s)"
    )
    group.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default: %(default)s)")
    group.add_argument(
        "--microbatch-size", type=int, default=8, help="sequences per micro-batch (default: %(default)s)"
    )
    group.add_argument(
        "--target-batch-size",
        type=int,
        default=64,
        help="sequences per optimizer step, summed over a stage's replicas (default: %(default)s)",
    )
    group.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (default: %(default)s)")
    group.add_argument(
        "--seed", type=int, default=0, help="model init and data order seed (default: %(default)s)"
    )
    group.add_argument(
        "--probation-s",
        type=float,
        default=600.0,
        help="seconds a new identity's reputation reports weigh nothing (default: %(default)s)",
    )
    group.add_argument(
        "--probation-work",
        type=int,
        default=20,
        help="clean exchanges others must vouch for before a reporter weighs (default: %(default)s)",
    )
    group.add_argument(
        "--min-reporters",
        type=int,
        default=2,
        help="independent trusted reporters needed to blacklist a peer (default: %(default)s)",
    )
    group.add_argument(
        "--report-period",
        type=float,
        default=5.0,
        help="seconds between a peer's reputation reports (default: %(default)s)",
    )
    group.add_argument(
        "--aggregator",
        default="centered_clip",
        choices=("centered_clip", "mean"),
        help="how a stage's replicas combine their gradients: centered_clip (Byzantine-tolerant) or "
        "mean (hivemind's weighted mean, no defence) (default: %(default)s)",
    )
    group.add_argument(
        "--clip-radius",
        type=float,
        default=1.0,
        help="CenteredClip radius, in lower-median distances of the replicas' contributions from "
        "their median (default: %(default)s)",
    )
    group.add_argument(
        "--clip-iters", type=int, default=20, help="CenteredClip iterations (default: %(default)s)"
    )
    group.add_argument(
        "--pow-bits",
        type=int,
        default=0,
        help="admission: proof-of-work difficulty per identity, in bits (0: off; 20 is about a second "
        "of one core per identity, each extra bit doubles it) (default: %(default)s)",
    )
    group.add_argument(
        "--tokenizer",
        default=None,
        metavar="FILE|DIR",
        help="the tokenizer every trainer of this swarm must use (for instance one made by `swarm "
        "tokenizer`); the config pins its digest (default: the shipped one)",
    )
    group.add_argument(
        "--authority-key",
        default=None,
        metavar="FILE",
        help="admission: an allowlist; identities need a token signed by this Ed25519 key (created if "
        "missing; keep it private), issued with `swarm admit`",
    )


def _admission(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("admission (only if the swarm's creator turned it on)")
    group.add_argument(
        "--admission-token",
        default=None,
        metavar="TOKEN|@FILE",
        help="this identity's allowlist token from the swarm's authority (`swarm admit`), or @FILE",
    )


def _data(parser: argparse.ArgumentParser, tokenizer: bool = True) -> None:
    group = parser.add_argument_group("data")
    group.add_argument(
        "--data",
        nargs="*",
        default=[],
        metavar="FILE",
        help="local .txt/.jsonl/.parquet files (default: the shipped corpus)",
    )
    group.add_argument(
        "--text-field", default="text", help="text column in jsonl/parquet (default: %(default)s)"
    )
    if tokenizer:
        group.add_argument(
            "--tokenizer",
            default=None,
            help="local tokenizer dir or tokenizer.json (default: shipped); it must be the one the "
            "swarm's config names",
        )


def _training(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training")
    group.add_argument(
        "--steps", type=int, default=50, help="optimizer steps to train (default: %(default)s)"
    )
    group.add_argument(
        "--max-inflight", type=int, default=4, help="micro-batches in flight (default: %(default)s)"
    )
    group.add_argument(
        "--max-attempts", type=int, default=5, help="tries per micro-batch (default: %(default)s)"
    )
    group.add_argument(
        "--audit-rate",
        type=float,
        default=0.1,
        help="share of micro-batches whose last-stage gradient a second (and if they disagree a third) "
        "replica recomputes, to catch what SENTINEL cannot see (sign flips, stale gradients); "
        "every micro-batch of a suspect last-stage peer is audited; 0 turns audits off "
        "(default: %(default)s)",
    )
    group.add_argument(
        "--metrics-out", default=None, metavar="FILE", help="JSON lines, one per optimizer step"
    )
    group.add_argument("--summary-json", default=None, metavar="FILE", help="the run's summary as JSON")
    group.add_argument(
        "--tensorboard",
        default=None,
        metavar="DIR",
        help="also write per-step loss, tokens/s and micro-batches completed/dropped/retried as TensorBoard "
        "scalars under DIR (needs the tensorboard package: pip install tensorboard)",
    )
    group.add_argument(
        "--compression",
        default="none",
        choices=["none", "float16", "meanstd16"],
        help="compression of activations/gradients on the wire (default: %(default)s)",
    )
    group.add_argument(
        "--no-dataplane",
        action="store_true",
        help="send chain tensors over hivemind P2P only, never over direct TLS connections to the next peer "
        "(swarm.dataplane; those are used only without --compression)",
    )


def _server(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("stage server")
    group.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="(default: %(default)s)"
    )
    group.add_argument(
        "--max-inflight", type=int, default=8, help="micro-batches held at once (default: %(default)s)"
    )
    group.add_argument(
        "--no-averaging",
        action="store_true",
        help="step a local optimizer without averaging with the stage's replicas (debugging only)",
    )
    group.add_argument(
        "--matchmaking-time",
        type=float,
        default=1.0,
        help="seconds replicas wait to form an averaging group (default: %(default)s)",
    )
    group.add_argument("--compression", default="none", choices=["none", "float16", "meanstd16"])
    group.add_argument(
        "--no-dataplane",
        action="store_true",
        help="send chain tensors over hivemind P2P only, never over direct TLS connections to the next peer "
        "(swarm.dataplane; those are used only without --compression)",
    )
    group.add_argument(
        "--grace",
        type=float,
        default=10.0,
        help="on SIGINT/SIGTERM: seconds to let in-flight micro-batches finish after announcing "
        "offline (default: %(default)s)",
    )
    _admission(parser)
    _sentinel(parser)
    _attack(parser, "--attack")
    _checkpoints(parser, resume=True)


def _checkpoints(parser: argparse.ArgumentParser, resume: bool) -> None:
    group = parser.add_argument_group("checkpoints (safetensors; see docs/operations.md)")
    group.add_argument(
        "--checkpoint-dir",
        default=None,
        metavar="DIR",
        help="save the stage's parameters and optimizer state here, and resume from them on a restart"
        + ("" if resume else " (each stage peer gets a directory of its own under DIR)"),
    )
    group.add_argument(
        "--checkpoint-every",
        default="10",
        metavar="N|Ns|Nm",
        help="optimizer steps (10) or a duration (300s, 5m) between checkpoints (default: %(default)s)",
    )
    if resume:
        group.add_argument(
            "--resume-from",
            default=None,
            metavar="DIR",
            help="start from a model exported by `swarm export` (its weights for this stage; fresh optimizer "
            "state)",
        )


def _sentinel(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("SENTINEL checks of received activations and gradients")
    group.add_argument(
        "--no-sentinel", action="store_true", help="use received tensors unchecked (baselines only)"
    )
    group.add_argument(
        "--sentinel-threshold",
        type=float,
        default=12.0,
        help="reject a tensor whose statistics lie more than this many spreads from a baseline",
    )
    group.add_argument(
        "--sentinel-warmup",
        type=int,
        default=12,
        help="tensors observed per baseline before any statistical verdict",
    )
    group.add_argument(
        "--sentinel-warmup-steps",
        type=int,
        default=10,
        help="training steps at the start during which only hard checks reject (the model changes "
        "fastest then; the baselines still learn)",
    )
    group.add_argument(
        "--recompute-rate",
        type=float,
        default=0.1,
        help="share of micro-batches whose gradient from a middle next stage, or at stage 1 whose activations from "
        "stage 0, this peer has recomputed by two other replicas of that stage, drawn from the trainer's signed "
        "header (every micro-batch of a newcomer's first 8 and of a suspect's, and every stage-0 tensor SENTINEL "
        "rejects); 0 turns it off",
    )


def _attack(parser: argparse.ArgumentParser, flag: str) -> None:
    from peers.attack_names import ATTACKS, DIRECTIONS

    group = parser.add_argument_group("Byzantine behaviour (experiments and tests only)")
    group.add_argument(
        flag, default=None, choices=ATTACKS, help="tamper with outgoing tensors with this attack"
    )
    group.add_argument("--attack-direction", default="both", choices=DIRECTIONS)
    group.add_argument(
        "--attack-magnitude", type=float, default=float("nan"), help="default: the attack's own"
    )
    group.add_argument("--attack-probability", type=float, default=1.0, help="per message")
    group.add_argument("--attack-start-step", type=int, default=0, help="honest before this optimizer step")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swarm",
        description="Decentralized, Byzantine-tolerant pipeline training over a hivemind DHT.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"swarm {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "dht",
        help="start a bootstrap peer that creates the swarm and prints its address",
        description="Bootstrap peer. Publishes the swarm's config (unless --no-config) and prints "
        "the address other peers join with. Runs until interrupted.",
    )
    _common(p, initial_peers=False)
    p.add_argument(
        "--initial-peers", nargs="*", default=[], metavar="ADDR", help="join an existing DHT instead"
    )
    p.add_argument("--no-config", action="store_true", help="only bootstrap the DHT, do not create a swarm")
    p.add_argument(
        "--resume-from",
        default=None,
        metavar="DIR",
        help="create the swarm to continue a checkpoint directory or an export: its model config and step "
        "(the config record says which step the swarm resumed from)",
    )
    _swarm_shape(p)

    p = sub.add_parser(
        "serve",
        help="serve one pipeline stage",
        description="Stage peer: reads the swarm's config from the DHT, loads its stage's current "
        "state from replicas, announces itself and serves until interrupted.",
    )
    _common(p)
    p.add_argument("--stage", type=int, required=True, help="the stage to serve (0-based)")
    _server(p)

    p = sub.add_parser(
        "join",
        help="volunteer a machine: serve the stage that needs capacity most",
        description="Joins a swarm from a GPU (or CPU) box: reads the swarm's config, picks the stage "
        "with the least announced throughput (unless --stage), loads its current state "
        "from its replicas, serves, and checks that the swarm can connect back. The "
        "peer id is kept in --identity, so a restart keeps its reputation. Ctrl-C leaves "
        "cleanly.",
    )
    _common(p)
    p.set_defaults(identity=os.path.join("~", ".swarm", "identity.key"))
    p.add_argument(
        "--stage",
        type=int,
        default=None,
        help="serve this stage instead of the one that needs capacity most (0-based)",
    )
    group = p.add_argument_group("reachability (peers behind NAT or a firewall)")
    group.add_argument(
        "--announce-addr",
        action="append",
        default=[],
        metavar="MADDR",
        help="an address others reach this peer at, e.g. /ip4/203.0.113.7/tcp/31338 (repeatable)",
    )
    group.add_argument(
        "--public-ip",
        default=None,
        metavar="IP",
        help="announce /ip4/IP/tcp/PORT with the listening port (a free one is fixed if --port 0)",
    )
    group.add_argument(
        "--auto-relay",
        action="store_true",
        help="when others cannot connect directly, be reached through relays among the swarm's peers",
    )
    group.add_argument("--no-relay", action="store_true", help="never use libp2p relays")
    group.add_argument(
        "--no-reachability-check", action="store_true", help="skip asking swarm peers to dial this peer back"
    )
    group.add_argument(
        "--require-reachable",
        action="store_true",
        help="leave (exit 2) if the swarm cannot connect to this peer directly",
    )
    _server(p)

    p = sub.add_parser(
        "train",
        help="run the trainer against a swarm",
        description="Trainer: feeds micro-batches of the data through chains of stage peers.",
    )
    _common(p)
    _data(p)
    _training(p)
    _admission(p)

    p = sub.add_parser(
        "admit",
        help="issue an allowlist token for one identity (the swarm's authority only)",
        description="Signs a token that admits one peer id to a swarm whose creator set "
        "--authority-key. Give the peer id, or the identity file the peer runs with.",
    )
    p.add_argument(
        "--authority-key", required=True, metavar="FILE", help="the swarm's authority key (from swarm dht)"
    )
    p.add_argument("--run-id", default=DEFAULT_RUN_ID, help="the swarm's name")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--peer-id", default=None, help="the identity to admit (base58 peer id)")
    who.add_argument(
        "--identity", default=None, metavar="PATH", help="the identity file of the peer to admit"
    )
    p.add_argument("--ttl-days", type=float, default=30.0, help="days the token stays valid")
    p.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    p = sub.add_parser(
        "status",
        help="show a swarm's peers, their reputation and the training progress",
        description="Reads the swarm's records from its DHT (joining as a client: it needs no part in "
        "the swarm) and prints one table per stage of every peer (address, state, "
        "throughput, micro-batches served, reputation, blacklisted and why, last seen) and "
        "the totals (step, loss, tokens/s, peers per stage, stages with no peer). "
        "--json prints the schema documented in swarm/status.py and the README.",
    )
    p.add_argument(
        "--initial-peers",
        nargs="+",
        required=True,
        metavar="ADDR",
        help="multiaddr(s) of any peer of the swarm, as printed by `swarm dht` or `swarm local`",
    )
    p.add_argument("--run-id", default=DEFAULT_RUN_ID, help="the swarm's name")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=5.0,
        default=None,
        metavar="SECONDS",
        help="refresh every SECONDS (5 if not given) until Ctrl-C",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=15.0,
        help="seconds to wait for the DHT to answer before giving up (a read of all records gets "
        "twice that, at least 30)",
    )
    group = p.add_argument_group("web dashboard")
    group.add_argument(
        "--serve",
        action="store_true",
        help="serve a live dashboard (and Prometheus /metrics) over HTTP instead of printing; it "
        "re-reads the swarm every --watch seconds (5 if not given)",
    )
    group.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface the dashboard listens on (default: %(default)s; 0.0.0.0 exposes it)",
    )
    group.add_argument(
        "--port", type=int, default=8080, help="the dashboard's TCP port (default: %(default)s)"
    )
    p.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    p = sub.add_parser(
        "local",
        help="start a whole swarm on 127.0.0.1, train, summarise, stop",
        description="Starts a bootstrap peer, STAGES x REPLICAS stage peers and a trainer as separate "
        "processes on 127.0.0.1, prints the bootstrap address first, trains, writes the "
        "summary and stops everything it started.",
    )
    _swarm_shape(p)
    # a local swarm lives minutes, not days: identities leave probation after seconds of verified work
    p.set_defaults(probation_s=5.0, probation_work=10, report_period=2.0)
    p.add_argument("--replicas", type=int, default=2, help="peers per stage (default: %(default)s)")
    p.add_argument("--run-id", default=DEFAULT_RUN_ID)
    p.add_argument("--workdir", default=None, help="where logs go (default: a new temporary directory)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument(
        "--startup-timeout", type=float, default=180.0, help="seconds to wait for the swarm to form"
    )
    p.add_argument(
        "--byzantine", type=int, default=0, help="how many stage peers run --attack (default: %(default)s)"
    )
    _sentinel(p)
    _attack(p, "--attack")
    _data(p, tokenizer=False)  # --tokenizer comes with the swarm config's flags
    _training(p)
    _checkpoints(p, resume=False)
    p.add_argument(
        "--export",
        default=None,
        metavar="DIR",
        help="after training, export the model to DIR (as `swarm export` does) before the peers stop",
    )

    p = sub.add_parser(
        "export",
        help="save a swarm's trained model as a transformers model directory",
        description="Gathers every stage's weights from its online replicas (each download checked "
        "against the stage's other replicas), writes config.json, model.safetensors, the "
        "tokenizer and a model card to --out, which AutoModelForCausalLM.from_pretrained "
        "loads, and reports the swarm's own evaluation loss on held-out blocks.",
    )
    _common(p)
    p.add_argument("--out", required=True, metavar="DIR", help="the model directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="the swarm's tokenizer (dir or tokenizer.json; default: the shipped one), saved with the model",
    )
    p.add_argument(
        "--eval-data",
        nargs="*",
        default=[],
        metavar="FILE",
        help="held-out text to evaluate the export on (default: the shipped corpus)",
    )
    p.add_argument(
        "--eval-blocks",
        type=int,
        default=16,
        help="blocks of --eval-data to evaluate (its last ones; 0: none) (default: %(default)s)",
    )
    p.add_argument(
        "--timeout", type=float, default=300.0, help="seconds to download one stage (default: %(default)s)"
    )

    p = sub.add_parser(
        "tokenizer",
        help="train a byte-level BPE tokenizer on your own files",
        description="Trains a byte-level BPE (the shipped tokenizer's recipe, with the `tokenizers` "
        "library) on local .txt/.jsonl/.parquet files, writes its tokenizer.json and "
        "prints how many tokens per byte it cuts your text into, beside the shipped one. "
        "Give it to `swarm dht --tokenizer FILE` (the swarm's config pins its digest) and "
        "to every `swarm train --tokenizer FILE`.",
    )
    p.add_argument("--data", nargs="+", required=True, metavar="FILE", help="files or directories of text")
    p.add_argument("--text-field", default="text", help="text column in jsonl/parquet (default: %(default)s)")
    p.add_argument(
        "--vocab-size",
        type=int,
        default=4096,
        help="tokens, at most the model's vocabulary (tiny and small: 4096) (default: %(default)s)",
    )
    p.add_argument("--out", required=True, metavar="FILE", help="the tokenizer.json to write")
    p.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    add_config_flag_everywhere(parser)  # last: every subcommand above gets --config FILE (and --debug)
    for command in sub.choices.values():
        command.add_argument(
            "--debug",
            action="store_true",
            help="on an unexpected failure, print the traceback (default: one error line)",
        )
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("swarm")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


class RoundSkipped(logging.Filter):
    """hivemind logs an averaging round that could not run (no group formed in time, a partner that left) as an
    ERROR with a traceback. In a swarm that is expected now and then, and tolerated: the replica steps with its own
    gradients and catches up at the next round. Say so, at INFO, in one line."""

    TOLERATED = ("could not find a group", "Unable to run All-Reduce", "averaging round", "was cancelled")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and any(t in record.getMessage() for t in self.TOLERATED):
            first = " ".join(record.getMessage().split())[:200]
            record.msg, record.args = (
                f"averaging round skipped (tolerated; the next round catches up): {first}",
                (),
            )
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("hivemind", "asyncio", "filelock", "datasets", "urllib3"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, getattr(logging, level)))
    logging.getLogger("hivemind.averaging.averager").addFilter(RoundSkipped())


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse ``argv`` with the chosen command's ``--config FILE`` (if any) as its defaults: flags win over the
    file. Bad input prints ``swarm: error: ...`` and raises SystemExit(2)."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:  # first pass: the command's --config FILE, then SWARM_* variables, become its defaults; flags win over both
        applied = apply_config_file(parser, argv)
        apply_environment(parser, argv, os.environ)
    except ConfigFileError as e:
        print(f"swarm: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    args = parser.parse_args(argv)
    if getattr(args, "config", None) is not None and args.config != applied:
        print(
            f"swarm: error: write the config flag in full: --config {args.config}",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(2)
    return args


def main(argv: Optional[List[str]] = None) -> int:
    if threading.current_thread() is threading.main_thread():
        # Ctrl-C must work even when the parent left SIGINT ignored (an ignored signal is inherited across exec)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args = parse_args(argv)
    except SystemExit as e:  # argparse's errors and --help
        return e.code if isinstance(e.code, int) else 2
    setup_logging(args.log_level)
    parent = os.environ.get(PARENT_PID_ENV, "")
    if parent.isdigit():  # started by `swarm local`: leave with it, however it dies
        from peers.common import die_with_parent

        die_with_parent(int(parent))
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    if args.command == "dht":
        from peers.dht_peer import run
    elif args.command == "serve":
        from peers.stage_peer import run
    elif args.command == "join":
        from peers.join import run
    elif args.command == "train":
        from peers.trainer_peer import run
    elif args.command == "admit":
        from peers.admit import run
    elif args.command == "status":
        from peers.status import run
    elif args.command == "tokenizer":
        from peers.tokenizer_cmd import run
    elif args.command == "export":
        from peers.export_cmd import run
    else:
        from peers.local import run
    from peers.common import UserError, fail

    try:
        code = run(args) or 0
    except UserError as e:
        if args.debug:
            logging.getLogger("swarm").exception(f"swarm {args.command}: user error")
        code = fail(str(e))
    except Exception as e:
        if args.debug:
            logging.getLogger("swarm").exception(f"swarm {args.command} failed")
        message = " ".join(str(e).split())[:500]
        print(
            f"swarm: error: swarm {args.command} failed: {type(e).__name__}: {message} (rerun with --debug for "
            f"the traceback)",
            file=sys.stderr,
            flush=True,
        )
        code = 1
    return code


def entrypoint() -> None:
    """Console-script entry: exit without waiting for hivemind's lingering non-daemon threads."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    from peers.common import end_orphaned_group

    end_orphaned_group()  # started by a launcher that is gone: take the DHT process and p2p daemon along
    os._exit(code)


if __name__ == "__main__":
    entrypoint()
