"""Tokenizers: training one on the user's files (`swarm tokenizer`), and the swarm config pinning the tokenizer
every trainer must use. Pure logic and the CLI in-process; no network."""

import json
from types import SimpleNamespace

import pytest

from peers.cli import main, parse_args
from peers.dht_peer import swarm_record
from peers.trainer_peer import tokenizer_mismatch
from swarm.data import SHIPPED_TOKENIZER, load_tokenizer
from swarm.records import SwarmConfigRecord
from swarm.tokenizer import tokenizer_digest, tokens_per_byte, train_bpe

CODE = "".join(f"def handler_{i}(request):\n    return request.value + {i}\n\n\n" for i in range(300))


def test_train_bpe_is_deterministic_and_fits_its_text_better_than_the_shipped_one(tmp_path):
    text = train_bpe([CODE] * 3, 600)
    assert text == train_bpe([CODE] * 3, 600)
    path = tmp_path / "tok.json"
    path.write_text(text)
    ours, shipped = load_tokenizer(str(path)), load_tokenizer(None)
    assert len(ours) <= 600 and ours.convert_tokens_to_ids("<|endoftext|>") == 0
    assert ours.decode(ours(CODE[:200])["input_ids"]) == CODE[:200]  # byte-level: lossless
    assert tokens_per_byte(ours, [CODE]) < 0.7 * tokens_per_byte(shipped, [CODE])
    with pytest.raises(ValueError, match="at least 258"):
        train_bpe([CODE], 100)


def test_swarm_tokenizer_command_writes_a_loadable_tokenizer(tmp_path, capsys):
    data = tmp_path / "code.txt"
    data.write_text(CODE)
    out = tmp_path / "tok.json"
    assert main(["tokenizer", "--data", str(data), "--vocab-size", "500", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    line = next(line for line in stdout.splitlines() if line.startswith("SWARM tokenizer "))
    event = json.loads(line.split(" ", 2)[2])
    assert event["path"] == str(out) and event["tokens_per_byte"] < event["shipped_tokens_per_byte"]
    assert event["sha256"] == tokenizer_digest(load_tokenizer(str(out)))
    assert main(["tokenizer", "--data", str(tmp_path / "none.txt"), "--out", str(out)]) == 2
    assert "--data" in capsys.readouterr().err
    assert main(["tokenizer", "--data", str(data), "--out", str(tmp_path / "no" / "tok.json")]) == 2


def test_the_config_pins_the_tokenizer_and_a_trainer_with_another_one_is_refused(tmp_path):
    custom = tmp_path / "tok.json"
    custom.write_text(train_bpe([CODE], 500))
    record = swarm_record(parse_args(["dht", "--tokenizer", str(custom)]))
    record = SwarmConfigRecord.from_value(record.to_value())  # what readers of the DHT record get
    pin = record.extra["tokenizer"]
    assert pin == {
        "sha256": tokenizer_digest(load_tokenizer(str(custom))),
        "size": len(load_tokenizer(str(custom))),
    }
    assert tokenizer_mismatch(record, load_tokenizer(str(custom)), str(custom)) == ""
    message = tokenizer_mismatch(record, load_tokenizer(None), None)
    assert "the shipped tokenizer is another" in message and "--tokenizer" in message
    default = swarm_record(parse_args(["dht"]))  # no --tokenizer: the shipped one is pinned
    assert default.extra["tokenizer"]["sha256"] == tokenizer_digest(load_tokenizer(str(SHIPPED_TOKENIZER)))
    assert tokenizer_mismatch(SimpleNamespace(extra={}), load_tokenizer(None), None) == ""  # an older swarm
    big = tmp_path / "big.json"
    big.write_text(train_bpe([CODE * 4], 5000))
    if len(load_tokenizer(str(big))) > 4096:
        with pytest.raises(ValueError, match="model's vocabulary"):
            swarm_record(parse_args(["dht", "--tokenizer", str(big)]))
