"""The command line as a new user meets it: help and version without torch, SWARM_* variables, one-line errors
found before any identity or process is created, tolerated failures logged as such. No swarm is started; two tests
start a p2p daemon that finds nobody at a dead address."""

import logging
import os
import subprocess
import sys

import pytest

from peers.cli import RoundSkipped, main, parse_args
from peers.trainer_peer import progress_bar

ADDR = "/ip4/127.0.0.1/tcp/31337/p2p/QmRFnbja9E1fh8J97BqyRhV5E1h7daep8bLxrrL7ByceYV"
DEAD = "/ip4/127.0.0.1/tcp/1/p2p/QmRFnbja9E1fh8J97BqyRhV5E1h7daep8bLxrrL7ByceYV"  # nothing listens on port 1


def _cli(*argv, env=None, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "peers.cli", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, **(env or {})),
    )


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("swarm: error: "), err
    assert "Traceback" not in err, err
    return lines[-1]


def test_help_and_version_do_not_import_torch():
    code = (
        "import sys\nfrom peers.cli import main\n"
        "codes = [main([c, '--help']) for c in ('serve', 'join', 'train', 'local', 'dht', 'status')]\n"
        "print('CODES', codes, 'torch' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "CODES [0, 0, 0, 0, 0, 0] False" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    proc = _cli("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("swarm "), proc
    proc = _cli("serve", "--attack", "nope", "--stage", "0", "--initial-peers", ADDR)  # an argument error
    assert proc.returncode == 2 and "invalid choice: 'nope'" in proc.stderr


def test_flags_win_over_environment_which_wins_over_config_file(tmp_path, monkeypatch):
    config = tmp_path / "c.yaml"
    config.write_text(f"initial_peers: [{ADDR}]\nstage: 1\nmax_inflight: 3\n")
    monkeypatch.setenv("SWARM_STAGE", "2")
    monkeypatch.setenv("SWARM_NO_SENTINEL", "yes")
    monkeypatch.setenv("SWARM_SENTINEL_THRESHOLD", "7.5")
    monkeypatch.setenv("SWARM_TORCH_INDEX", "https://example.invalid")  # not a flag: ignored
    args = parse_args(["serve", "--config", str(config)])
    assert (args.stage, args.max_inflight, args.no_sentinel, args.sentinel_threshold) == (2, 3, True, 7.5)
    assert args.initial_peers == [ADDR]
    args = parse_args(["serve", "--config", str(config), "--stage", "0"])
    assert args.stage == 0
    monkeypatch.setenv("SWARM_INITIAL_PEERS", f"{ADDR},{ADDR}")  # a flag of several values: commas or spaces
    assert parse_args(["train"]).initial_peers == [ADDR, ADDR]


@pytest.mark.parametrize(
    "name, value, expect",
    [
        ("SWARM_STAGE", "one", "environment variable SWARM_STAGE: expected an integer, got 'one'"),
        ("SWARM_NO_SENTINEL", "maybe", "environment variable SWARM_NO_SENTINEL: expected 1/true/yes/on"),
        ("SWARM_COMPRESSION", "zip", "environment variable SWARM_COMPRESSION: invalid choice 'zip'"),
    ],
)
def test_bad_environment_values_are_one_error_line(monkeypatch, capsys, name, value, expect):
    monkeypatch.setenv(name, value)
    assert main(["serve", "--initial-peers", ADDR]) == 2
    assert expect in _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "--stage", "0", "--initial-peers", "bogus"],
        ["train", "--initial-peers", "/ip4/127.0.0.1/tcp/31337"],  # no /p2p/ peer id
        ["dht", "--initial-peers", "127.0.0.1:31337"],
        ["join", "--initial-peers", "bogus"],
    ],
)
def test_a_bad_address_is_refused_before_any_identity_or_process(tmp_path, capsys, argv):
    identity = tmp_path / "home" / "identity.key"
    assert main([*argv, "--identity", str(identity)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "is not a peer multiaddr like /ip4/HOST/tcp/PORT/p2p/PEER_ID" in line
    assert not identity.exists() and not identity.parent.exists()


def test_a_dead_address_is_one_line_saying_what_to_check():
    for argv in (["serve", "--stage", "0"], ["dht"]):
        proc = _cli(*argv, "--initial-peers", DEAD)
        assert proc.returncode == 2, proc
        line = _one_error_line(proc.stderr)
        assert f"no peer answered at {DEAD}" in line and "`swarm dht` printed" in line


def test_missing_data_and_bad_local_shape_fail_before_the_dht(tmp_path, capsys):
    missing = str(tmp_path / "missing.jsonl")
    assert main(["train", "--initial-peers", DEAD, "--data", missing]) == 2  # no DHT: it would take seconds
    assert f"--data {missing}: no such file or directory" in _one_error_line(capsys.readouterr().err)
    assert main(["local", "--model", "huge", "--workdir", str(tmp_path / "w")]) == 2
    assert "unknown model preset 'huge'" in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "w").exists()


def test_an_unexpected_failure_is_one_line_unless_debug(monkeypatch, capsys, caplog):
    import peers.admit

    def broken(args):
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr(peers.admit, "run", broken)
    argv = ["admit", "--authority-key", "k", "--peer-id", "x"]
    assert main(argv) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "swarm admit failed: RuntimeError: disk on fire second line (rerun with --debug" in line
    assert main([*argv, "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err + caplog.text


def test_skipped_averaging_rounds_are_logged_as_tolerated_info(caplog):
    log = logging.getLogger("test.averager")
    log.addFilter(RoundSkipped())
    with caplog.at_level(logging.INFO, logger="test.averager"):
        try:
            raise RuntimeError("Averaging step failed: could not find a group")
        except RuntimeError as e:
            log.exception(e)
        log.error("something else broke")
    first, second = caplog.records
    assert first.levelno == logging.INFO and first.exc_info is None
    assert first.getMessage().startswith("averaging round skipped (tolerated")
    assert second.levelno == logging.ERROR and second.getMessage() == "something else broke"


def test_progress_bar():
    assert progress_bar(7, 20, 63.2) == "[#######.............]  35% 1m03s, ETA 1m57s"
    assert progress_bar(20, 20, 300.0).endswith("100% 5m00s, ETA 0s")
    assert progress_bar(0, 20, 0.0).endswith("ETA ?")
