"""The trainer's TensorBoard reporter: what it writes, read back with TensorBoard's own reader; and the flag's
errors (`swarm train|local --tensorboard DIR`, SWARM_TENSORBOARD) as one `swarm: error:` line before the DHT."""

import importlib.util
import os

import pytest

from peers.cli import main, parse_args
from peers.local import training_args

pytest.importorskip("tensorboard", reason="the tensorboard package (the 'tensorboard' and 'dev' extras)")

from swarm.tensorboard import TensorBoardReporter  # noqa: E402

DEAD = "/ip4/127.0.0.1/tcp/1/p2p/QmRFnbja9E1fh8J97BqyRhV5E1h7daep8bLxrrL7ByceYV"  # nothing listens on port 1

ROWS = [  # Trainer's metrics rows (the --metrics-out lines), cumulative tokens and retries
    dict(step=0, loss=8.25, tokens=4096, elapsed_s=2.0, completed=4, dropped=0, retried=1),
    dict(step=1, loss=None, tokens=4096, elapsed_s=5.0, completed=0, dropped=4, retried=3),
    dict(step=2, loss=7.5, tokens=8192, elapsed_s=6.0, completed=4, dropped=0, retried=3),
]
SUMMARY = dict(
    steps=3,
    timing={"stage0": {"fwd_s": 0.25, "bwd_s": 0.5}, "chain": {"total_s": 1.5}},
    drop_reasons={"timeout": 4},
    retry_reasons={"rejected": 3},
)


def read_scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = [f for f in os.listdir(log_dir) if f.startswith("events.out.tfevents.")]
    assert len(files) == 1, files
    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = {
        tag: [(e.step, pytest.approx(e.value)) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]
    }
    return scalars, acc


def test_reporter_writes_every_step_and_the_summary(tmp_path):
    log_dir = str(tmp_path / "tb")
    reporter = TensorBoardReporter(log_dir)
    for row in ROWS:
        reporter.on_step(row)
    reporter.close(SUMMARY)
    scalars, acc = read_scalars(log_dir)
    assert scalars["train/loss"] == [(0, 8.25), (2, 7.5)]  # a step that completed nothing has no loss
    assert scalars["train/tokens"] == [(0, 4096), (1, 4096), (2, 8192)]
    assert scalars["train/tokens_per_s"] == [(0, 2048), (1, 4096 / 5), (2, 8192 / 6)]
    assert scalars["microbatches/completed"] == [(0, 4), (1, 0), (2, 4)]
    assert scalars["microbatches/dropped"] == [(0, 0), (1, 4), (2, 0)]
    assert scalars["microbatches/retried"] == [(0, 1), (1, 3), (2, 3)]
    assert scalars["microbatches/retried_step"] == [(0, 1), (1, 2), (2, 0)]
    assert scalars["time/elapsed_s"] == [(0, 2), (1, 5), (2, 6)]
    assert scalars["time/step_s"] == [(0, 2), (1, 3), (2, 1)]
    assert scalars["timing/stage0/fwd_s"] == [(2, 0.25)] and scalars["timing/chain/total_s"] == [(2, 1.5)]
    texts = acc.Tags()["tensors"]
    assert {"summary/drop_reasons/text_summary", "summary/retry_reasons/text_summary"} <= set(texts), texts


def test_reporter_closed_without_a_summary_keeps_the_steps(tmp_path):
    """A run that failed midway (no summary) still leaves the steps it trained."""
    reporter = TensorBoardReporter(str(tmp_path))
    reporter.on_step(ROWS[0])
    reporter.close(None)
    scalars, _ = read_scalars(str(tmp_path))
    assert scalars["train/loss"] == [(0, 8.25)] and not any(t.startswith("timing/") for t in scalars)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("swarm: error: ") and "Traceback" not in err, err
    return lines[0]


def test_missing_package_is_one_error_line_saying_how_to_install(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a)
    )
    tb = str(tmp_path / "tb")
    # before the DHT (a dead address would otherwise take seconds to fail) and before any process
    assert main(["train", "--initial-peers", DEAD, "--tensorboard", tb]) == 2
    assert "pip install tensorboard" in _error_line(capsys)
    assert main(["local", "--tensorboard", tb, "--workdir", str(tmp_path / "w")]) == 2
    assert "pip install tensorboard" in _error_line(capsys)
    assert not (tmp_path / "w").exists() and not os.path.exists(tb)


def test_unwritable_directory_is_one_error_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert main(["train", "--initial-peers", DEAD, "--tensorboard", str(blocker / "tb")]) == 2
    assert f"--tensorboard {blocker / 'tb'}: cannot create the directory" in _error_line(capsys)


def test_flag_env_var_and_local_pass_it_to_the_trainer(tmp_path, monkeypatch):
    assert parse_args(["train", "--initial-peers", DEAD]).tensorboard is None
    monkeypatch.setenv("SWARM_TENSORBOARD", "runs/env")
    assert parse_args(["train", "--initial-peers", DEAD]).tensorboard == "runs/env"
    assert (
        parse_args(["train", "--initial-peers", DEAD, "--tensorboard", "runs/flag"]).tensorboard
        == "runs/flag"
    )
    monkeypatch.delenv("SWARM_TENSORBOARD")
    args = parse_args(["local", "--tensorboard", "runs/x"])
    extra = training_args(args, "m.jsonl", "s.json")
    # the trainer runs in another working directory's process: it gets an absolute path
    assert extra[extra.index("--tensorboard") + 1] == os.path.abspath("runs/x")
    assert "--tensorboard" not in training_args(parse_args(["local"]), "m.jsonl", "s.json")
