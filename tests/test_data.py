"""Tests for swarm.data: the shipped assets, corpus loading through ``datasets``, and the micro-batch stream."""

from __future__ import annotations

import json
import logging
import re

import pandas as pd
import pytest
import torch

from swarm import data
from swarm.config import DataConfig

logger = logging.getLogger(__name__)

EOS_ID = 0


@pytest.fixture(scope="module")
def tokenizer():
    return data.load_tokenizer()


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _flat(blocks):
    return blocks.reshape(-1).tolist()


# ---------------------------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------------------------


def test_shipped_assets_exist_and_are_small():
    assert data.SHIPPED_CORPUS.is_file() and data.SHIPPED_TOKENIZER.is_file()
    assert data.SHIPPED_CORPUS.stat().st_size + data.SHIPPED_TOKENIZER.stat().st_size < 4_000_000
    with open(data.SHIPPED_CORPUS) as f:
        first = json.loads(f.readline())
    assert isinstance(first["text"], str) and first["text"]


def test_shipped_tokenizer(tokenizer):
    assert data.vocab_size(tokenizer) == 4096 == len(tokenizer)
    assert tokenizer.eos_token == tokenizer.pad_token == tokenizer.bos_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == EOS_ID
    for text in [
        "Once upon a time, Mia had 3 plums.",
        "  tabs\tand\nnewlines\n\n",
        "Zoë ate crème brûlée 🙂",
        "",
    ]:
        ids = _ids(tokenizer, text)
        assert all(0 <= i < 4096 for i in ids)
        assert tokenizer.decode(ids) == text
    # the corpus' own words compress well
    assert len(_ids(tokenizer, "The cat walked to the market with her friend.")) <= 12


def test_load_tokenizer_from_dir_and_file(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path / "tok")
    from_dir = data.load_tokenizer(str(tmp_path / "tok"))
    assert len(from_dir) == 4096 and from_dir.eos_token_id == EOS_ID
    from_file = data.load_tokenizer(str(data.SHIPPED_TOKENIZER))
    assert from_file.eos_token_id == EOS_ID and from_file.pad_token_id == EOS_ID  # found by name
    text = "A fox has four legs."
    assert _ids(from_dir, text) == _ids(from_file, text) == _ids(tokenizer, text)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        data.load_tokenizer(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="could not load a tokenizer"):
        data.load_tokenizer(str(tmp_path / "empty"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="could not load a tokenizer"):
        data.load_tokenizer(str(tmp_path / "bad.json"))


# ---------------------------------------------------------------------------------------------------------
# token blocks
# ---------------------------------------------------------------------------------------------------------


def test_shipped_corpus_blocks(tokenizer):
    cfg = DataConfig(seq_len=128)
    blocks = data.load_token_blocks(cfg, tokenizer)
    logger.info("shipped corpus: %d blocks of 128 tokens", blocks.shape[0])
    assert blocks.dtype == torch.int64 and blocks.dim() == 2 and blocks.shape[1] == 128
    assert (
        blocks.shape[0] >= 64 * 50
    )  # more than 50 optimizer steps of 64 sequences without repeating a block
    assert int(blocks.min()) >= 0 and int(blocks.max()) < 4096
    with open(data.SHIPPED_CORPUS) as f:
        num_docs = sum(1 for _ in f)
    assert (
        int((blocks == EOS_ID).sum()) >= num_docs * 0.95
    )  # one eos per document (the cut tail may lose one)
    # memoised: the same config gives the same tensor, also when the tokenizer is loaded from the config
    assert data.load_token_blocks(cfg, tokenizer) is blocks
    assert data.load_token_blocks(DataConfig(seq_len=128)) is blocks
    # another seq_len is the same token stream, cut differently
    half = data.load_token_blocks(DataConfig(seq_len=64), tokenizer)
    assert half.shape[0] in (2 * blocks.shape[0], 2 * blocks.shape[0] + 1)
    assert torch.equal(half[: 2 * blocks.shape[0]].reshape(-1, 128), blocks)


def test_text_file(tmp_path, tokenizer):
    path = tmp_path / "notes.txt"
    paras = ["The first paragraph.\nIt has two lines.", "The second one.", "A third, with 12 numbers."]
    path.write_text("\n\n".join(paras) + "\n\n\n")
    blocks = data.load_token_blocks(DataConfig(paths=[str(path)], seq_len=4), tokenizer)
    expected = []
    for p in paras:
        expected += _ids(tokenizer, p) + [EOS_ID]
    n = len(expected) // 4
    assert blocks.shape == (n, 4) and blocks.dtype == torch.int64
    assert _flat(blocks) == expected[: n * 4]


def test_markdown_and_directory(tmp_path, tokenizer):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Title\n\nSome text about owls.")
    (tmp_path / "docs" / "b.txt").write_text("More text about crows.")
    (tmp_path / "docs" / "ignored.csv").write_text("x,y\n1,2\n")
    blocks = data.load_token_blocks(DataConfig(paths=[str(tmp_path / "docs")], seq_len=2), tokenizer)
    expected = []
    for p in ["# Title", "Some text about owls.", "More text about crows."]:
        expected += _ids(tokenizer, p) + [EOS_ID]
    assert _flat(blocks) == expected[: len(expected) // 2 * 2]


def test_jsonl_custom_field_and_mixed_kinds(tmp_path, tokenizer):
    jsonl = tmp_path / "docs.jsonl"
    rows = [
        {"id": 1, "content": "A cat has four legs."},
        {"id": 2, "content": "   "},
        {"id": 3, "content": None},
        {"id": 4, "content": "A spider has eight legs."},
    ]
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    parquet = tmp_path / "docs.parquet"
    pd.DataFrame({"content": ["Ducks live in ponds.", "Owls eat mice."], "n": [1, 2]}).to_parquet(parquet)
    array_json = tmp_path / "more.json"
    array_json.write_text(json.dumps([{"content": "Bees make honey."}]))

    cfg = DataConfig(paths=[str(jsonl), str(parquet), str(array_json)], text_field="content", seq_len=3)
    blocks = data.load_token_blocks(cfg, tokenizer)
    # json files are read together (in order of first appearance of their kind), then parquet
    texts = [
        "A cat has four legs.",
        "A spider has eight legs.",
        "Bees make honey.",
        "Ducks live in ponds.",
        "Owls eat mice.",
    ]
    expected = []
    for t in texts:
        expected += _ids(tokenizer, t) + [EOS_ID]
    assert _flat(blocks) == expected[: len(expected) // 3 * 3]


def test_parquet_default_field(tmp_path, tokenizer):
    path = tmp_path / "p.parquet"
    pd.DataFrame({"text": [f"Document number {i} is here." for i in range(50)]}).to_parquet(path)
    blocks = data.load_token_blocks(DataConfig(paths=[str(path)], seq_len=16), tokenizer)
    assert blocks.shape[1] == 16 and blocks.shape[0] >= 10
    first = _ids(tokenizer, "Document number 0 is here.") + [EOS_ID]
    assert _flat(blocks)[: len(first)] == first


def test_changed_file_is_reloaded(tmp_path, tokenizer):
    path = tmp_path / "c.txt"
    path.write_text("one two three four five six")
    first = data.load_token_blocks(DataConfig(paths=[str(path)], seq_len=2), tokenizer)
    path.write_text("seven eight nine ten eleven twelve thirteen")
    second = data.load_token_blocks(DataConfig(paths=[str(path)], seq_len=2), tokenizer)
    assert (
        _flat(second)
        == (_ids(tokenizer, "seven eight nine ten eleven twelve thirteen") + [EOS_ID])[: second.numel()]
    )
    assert _flat(first) != _flat(second)


def test_bad_inputs(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="not found"):
        data.load_token_blocks(DataConfig(paths=[str(tmp_path / "missing.jsonl")]), tokenizer)
    csv = tmp_path / "x.csv"
    csv.write_text("text\nhello\n")
    with pytest.raises(ValueError, match=r"unsupported data file extension '\.csv'"):
        data.load_token_blocks(DataConfig(paths=[str(csv)]), tokenizer)
    jsonl = tmp_path / "y.jsonl"
    jsonl.write_text(json.dumps({"body": "hi", "title": "t"}) + "\n")
    with pytest.raises(ValueError, match=r"'text' not found.*columns present: \['body', 'title'\]"):
        data.load_token_blocks(DataConfig(paths=[str(jsonl)]), tokenizer)
    numbers = tmp_path / "n.jsonl"
    numbers.write_text(json.dumps({"text": 5}) + "\n")
    with pytest.raises(ValueError, match="not strings"):
        data.load_token_blocks(DataConfig(paths=[str(numbers)]), tokenizer)
    small = tmp_path / "small.txt"
    small.write_text("Just a few words.")
    with pytest.raises(ValueError, match="fewer than data.seq_len=128"):
        data.load_token_blocks(DataConfig(paths=[str(small)], seq_len=128), tokenizer)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="holds no"):
        data.load_token_blocks(DataConfig(paths=[str(tmp_path / "nothing")]), tokenizer)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(ValueError, match=rf"data file {broken}: line 2 is not valid JSON"):
        data.load_token_blocks(DataConfig(paths=[str(broken)]), tokenizer)
    # what datasets reports only as "An error occurred while generating the dataset": the file and the line or byte
    for name, content, expect in [
        ("empty.jsonl", b"", "is empty"),
        ("empty.txt", b"", "is empty"),
        ("list.jsonl", b'{"text": "a"}\n[1, 2]\n', "line 2 is a JSON list, not an object"),
        ("binary.txt", b"fine text\n\xff\xfe\x00binary", "byte 10 (line 2) is not UTF-8 text"),
    ]:
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ValueError, match=re.escape(f"data file {path}") + ".*" + re.escape(expect)):
            data.load_token_blocks(DataConfig(paths=[str(path)]), tokenizer)
    with pytest.raises(ValueError, match="tokenizer path does not exist"):
        data.load_token_blocks(DataConfig(paths=[str(small)], tokenizer=str(tmp_path / "no-tokenizer")))


def test_rows_without_text_are_skipped_and_counted(tmp_path, tokenizer, caplog):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        "\n".join([json.dumps({"text": None})] + [json.dumps({"text": "word " * 400})] * 2) + "\n"
    )
    with caplog.at_level("WARNING", logger="swarm.data"):
        data.load_token_blocks(DataConfig(paths=[str(rows)], seq_len=16), tokenizer)
    assert f"1 of 3 rows of {rows} have no 'text' (null): skipped" in caplog.text


# ---------------------------------------------------------------------------------------------------------
# micro-batch stream
# ---------------------------------------------------------------------------------------------------------


def _toy_blocks(n, seq_len=3):
    return torch.arange(n * seq_len, dtype=torch.long).reshape(n, seq_len)


def _rows(batch, seq_len=3):
    return (batch[:, 0] // seq_len).tolist()


def test_stream_shapes_and_properties():
    stream = data.MicroBatchStream(_toy_blocks(10), microbatch_size=4, seed=1)
    assert stream.num_blocks == 10 and stream.seq_len == 3
    assert stream.microbatches_per_epoch == 3
    assert stream.tokens_per_microbatch == 12
    batch = stream.microbatch(0)
    assert batch.shape == (4, 3) and batch.dtype == torch.int64
    assert data.MicroBatchStream(_toy_blocks(8), 4).microbatches_per_epoch == 2


def test_stream_is_deterministic_and_order_independent():
    blocks = _toy_blocks(37)
    a = data.MicroBatchStream(blocks, 5, seed=3)
    b = data.MicroBatchStream(blocks.clone(), 5, seed=3)
    forward = [a.microbatch(i) for i in range(40)]
    backward = [b.microbatch(i) for i in reversed(range(40))][::-1]
    for x, y in zip(forward, backward, strict=True):
        assert torch.equal(x, y)
    other_seed = data.MicroBatchStream(blocks, 5, seed=4)
    assert any(not torch.equal(other_seed.microbatch(i), forward[i]) for i in range(8))


def test_stream_golden_permutation():
    # pinned so that peers on other machines and library versions agree on every micro-batch
    stream = data.MicroBatchStream(_toy_blocks(10), microbatch_size=5, seed=0)
    assert _rows(stream.microbatch(0)) + _rows(stream.microbatch(1)) == [0, 9, 1, 6, 3, 5, 4, 2, 8, 7]
    assert _rows(stream.microbatch(2)) + _rows(stream.microbatch(3)) == [8, 3, 0, 1, 5, 2, 7, 4, 9, 6]
    seeded = data.MicroBatchStream(_toy_blocks(10), microbatch_size=10, seed=7)
    assert _rows(seeded.microbatch(0)) == [8, 5, 3, 2, 9, 7, 6, 0, 1, 4]


@pytest.mark.parametrize("num_blocks,size", [(10, 4), (12, 4), (7, 3), (5, 8), (1, 1), (1, 3)])
def test_stream_epochs_wrap_cleanly(num_blocks, size):
    stream = data.MicroBatchStream(_toy_blocks(num_blocks), microbatch_size=size, seed=11)
    num_epochs = 5
    needed = -(-num_epochs * num_blocks // size)
    order = []
    for i in range(needed):
        assert stream.epoch_of(i) == i * size // num_blocks
        order += _rows(stream.microbatch(i))
    epochs = [order[e * num_blocks : (e + 1) * num_blocks] for e in range(num_epochs)]
    for epoch in epochs:  # every block exactly once per epoch, epochs back to back
        assert sorted(epoch) == list(range(num_blocks))
    if num_blocks >= 7:
        assert len({tuple(e) for e in epochs}) == num_epochs  # a fresh shuffle each epoch


def test_stream_rejects_bad_input():
    with pytest.raises(ValueError):
        data.MicroBatchStream(torch.zeros(5, dtype=torch.long), 2)
    with pytest.raises(ValueError):
        data.MicroBatchStream(torch.zeros(0, 4, dtype=torch.long), 2)
    with pytest.raises(ValueError):
        data.MicroBatchStream(_toy_blocks(4), 0)
    with pytest.raises(ValueError):
        data.MicroBatchStream(_toy_blocks(4), 2).microbatch(-1)


def test_stream_over_shipped_corpus(tokenizer):
    blocks = data.load_token_blocks(DataConfig(seq_len=128), tokenizer)
    stream = data.MicroBatchStream(blocks, microbatch_size=8, seed=0)
    batch = stream.microbatch(123)
    assert batch.shape == (8, 128)
    assert torch.equal(batch, data.MicroBatchStream(blocks, 8, seed=0).microbatch(123))
