"""Config files (`--config FILE`, YAML or TOML) for every role: pure parsing, no network."""

import subprocess
import sys

import pytest

from peers.cli import build_parser, main, parse_args
from peers.config_file import ConfigFileError, defaults_from_file

ADDR = "/ip4/127.0.0.1/tcp/31337/p2p/QmRFnbja9E1fh8J97BqyRhV5E1h7daep8bLxrrL7ByceYV"


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def error_of(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("swarm: error: "), err
    assert "Traceback" not in err
    return err


def test_every_command_has_config_flag():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert {"dht", "serve", "train", "local"} <= set(sub.choices)
    for name, p in sub.choices.items():
        assert any("--config" in a.option_strings for a in p._actions), name


def test_yaml_sets_flags_of_their_types(tmp_path):
    path = write(
        tmp_path,
        "serve.yaml",
        f"""
initial-peers: [{ADDR}]
stage: 1
run_id: demo
compression: float16
no_sentinel: true
sentinel-threshold: 8
attack_magnitude: 2e-3   # YAML reads this as a string; it is a float flag
""",
    )
    args = parse_args(["serve", "--config", path])
    assert args.initial_peers == [ADDR]
    assert args.stage == 1 and isinstance(args.stage, int)
    assert args.run_id == "demo"
    assert args.compression == "float16"
    assert args.no_sentinel is True
    assert args.sentinel_threshold == 8.0 and isinstance(args.sentinel_threshold, float)
    assert args.attack_magnitude == pytest.approx(2e-3)
    assert args.config == path
    # untouched flags keep their defaults
    assert args.max_inflight == 8 and args.host == "127.0.0.1"


def test_toml_and_per_command_tables(tmp_path):
    path = write(
        tmp_path,
        "swarm.toml",
        f"""
run_id = "shared"
initial_peers = ["{ADDR}"]

[dht]
port = 31337
stages = 3

[train]
steps = 7
data = ["a.txt", "b.jsonl"]
max-inflight = 2

[serve]
stage = 2
""",
    )
    train = parse_args(["train", "--config", path])
    assert (train.run_id, train.initial_peers, train.steps, train.data, train.max_inflight) == (
        "shared",
        [ADDR],
        7,
        ["a.txt", "b.jsonl"],
        2,
    )
    serve = parse_args(["serve", "--config", path])
    assert (serve.run_id, serve.stage) == ("shared", 2)
    dht = parse_args(["dht", f"--config={path}"])
    assert (dht.port, dht.stages, dht.initial_peers) == (31337, 3, [ADDR])


def test_flags_win_over_file(tmp_path):
    path = write(tmp_path, "train.yml", f"initial_peers: [{ADDR}]\nsteps: 7\ncompression: float16\n")
    args = parse_args(
        ["train", "--steps", "3", "--config", path, "--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/QmX"]
    )
    assert args.steps == 3
    assert args.initial_peers == ["/ip4/127.0.0.1/tcp/1/p2p/QmX"]
    assert args.compression == "float16"  # not on the command line: the file's


def test_required_flag_from_file(tmp_path):
    with pytest.raises(SystemExit):
        parse_args(["serve", "--stage", "0"])  # --initial-peers is required...
    path = write(tmp_path, "serve.yaml", f"initial_peers: {ADDR}\n")  # ...and a single value counts as a list
    args = parse_args(["serve", "--config", path, "--stage", "0"])
    assert args.initial_peers == [ADDR] and args.stage == 0


def test_unknown_key(tmp_path, capsys):
    path = write(tmp_path, "serve.yaml", f"initial_peers: [{ADDR}]\nstage: 0\nsteps: 5\n")
    err = error_of(["serve", "--config", path], capsys)
    assert "unknown key 'steps'" in err and path in err and "swarm serve" in err
    path = write(tmp_path, "bad.toml", "[train]\nbogus_key = 1\n")
    err = error_of(["train", "--config", path, "--initial-peers", ADDR], capsys)
    assert "'train.bogus_key'" in err and path in err


@pytest.mark.parametrize(
    "text, key, expect",
    [
        ("stage: two", "stage", "expected an integer"),
        ("stage: 1.5", "stage", "expected an integer"),
        ("stage: true", "stage", "expected an integer, got a boolean"),
        ("stage: [1, 2]", "stage", "expected a single value"),
        ("no_sentinel: yes-please", "no_sentinel", "expected true or false"),
        ("compression: zip", "compression", "invalid choice"),
        ("sentinel_threshold: fast", "sentinel_threshold", "expected a number"),
        ("sentinel_threshold: .inf", "sentinel_threshold", "finite"),
        ("initial_peers: []", "initial_peers", "at least one value"),
        ("initial_peers: {a: 1}", "initial_peers", "expected a single value"),
    ],
)
def test_bad_types(tmp_path, capsys, text, key, expect):
    path = write(tmp_path, "serve.yaml", text + "\n")
    err = error_of(["serve", "--config", path, "--initial-peers", ADDR, "--stage", "0"], capsys)
    assert f"key '{key}'" in err and path in err and expect in err, err


@pytest.mark.parametrize(
    "name, text, expect",
    [
        ("missing.yaml", None, "cannot read config file"),
        ("list.yaml", "- a\n- b\n", "must hold a mapping"),
        ("broken.yaml", "stage: [1\n", "not valid YAML"),
        ("broken.toml", "stage = \n", "not valid TOML"),
        ("conf.json", "{}", "unknown format"),
        ("section.yaml", "serve: 3\n", "must be a table"),
    ],
)
def test_unusable_files(tmp_path, capsys, name, text, expect):
    path = str(tmp_path / name) if text is None else write(tmp_path, name, text)
    err = error_of(["serve", "--config", path, "--initial-peers", ADDR, "--stage", "0"], capsys)
    assert expect in err and path in err, err


def test_main_returns_2_and_console_script_message(tmp_path, capsys):
    path = write(tmp_path, "dht.yaml", "stages: many\n")
    assert main(["dht", "--config", path]) == 2
    assert "key 'stages'" in capsys.readouterr().err
    # the real command line: exit code 2, one clear line, no traceback
    proc = subprocess.run(
        [sys.executable, "-m", "peers.cli", "train", "--config", str(tmp_path / "nope.toml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("swarm: error: cannot read config file") and "Traceback" not in proc.stderr


def test_empty_file_and_abbreviated_flag(tmp_path, capsys):
    path = write(tmp_path, "empty.yaml", "")
    assert parse_args(["dht", "--config", path]).stages == 2
    err = error_of(["dht", "--conf", path], capsys)
    assert "--config" in err


def test_defaults_from_file_direct(tmp_path):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    path = write(tmp_path, "local.yaml", "stages: 3\nreplicas: 1\nbyzantine: 1\nattack: noise\ndata: x.txt\n")
    got = defaults_from_file(sub.choices["local"], path, "local", sub.choices)
    assert got == {"stages": 3, "replicas": 1, "byzantine": 1, "attack": "noise", "data": ["x.txt"]}
    with pytest.raises(ConfigFileError, match="invalid choice"):
        write(tmp_path, "local.yaml", "attack: nuke\n")
        defaults_from_file(sub.choices["local"], path, "local", sub.choices)
