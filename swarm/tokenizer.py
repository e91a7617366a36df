"""Tokenizers a swarm trains with: training a byte-level BPE on a user's own text (the recipe of the shipped one),
and the digest that pins a swarm's tokenizer in its config record, so that every trainer feeds the model the same
token ids.

The shipped tokenizer (``swarm/assets/tokenizer.json``, built by ``scripts/build_assets.py`` with
:func:`train_bpe`) was trained on the shipped English stories; on other text (source code, another language) a
tokenizer trained on that text cuts it into fewer tokens (``swarm tokenizer`` prints both rates).
"""

from __future__ import annotations

import hashlib
from typing import Iterable, List, Sequence

EOS_TOKEN = "<|endoftext|>"


def train_bpe(texts: Sequence[str], vocab_size: int) -> str:
    """Train a byte-level BPE of at most ``vocab_size`` entries (``<|endoftext|>`` is id 0 and the eos token) on
    ``texts``; returns the ``tokenizer.json`` text. Fewer entries when the text has fewer distinct merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if vocab_size < 257 + 1:
        raise ValueError(
            f"--vocab-size must be at least 258 (256 bytes, the eos token and one merge), got {vocab_size}"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer, length=len(texts))
    return tok.to_str(pretty=False)


def tokenizer_digest(tokenizer) -> str:
    """SHA-256 of a tokenizer's full definition (a fast tokenizer's JSON; else its vocabulary), its eos id and size:
    what a swarm's config pins, and what a trainer's tokenizer must match."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode("utf-8"))
    else:  # a slow tokenizer: its vocabulary and class stand in for its full definition
        digest.update(type(tokenizer).__qualname__.encode("utf-8"))
        digest.update(repr(sorted(tokenizer.get_vocab().items())).encode("utf-8"))
    digest.update(f"|eos={tokenizer.eos_token_id}|len={len(tokenizer)}".encode("utf-8"))
    return digest.hexdigest()


def tokens_per_byte(tokenizer, texts: Iterable[str], max_bytes: int = 4 << 20) -> float:
    """Tokens per UTF-8 byte of ``texts`` (the first ``max_bytes`` of them): lower is a better fit."""
    batch: List[str] = []
    size = 0
    for text in texts:
        if not isinstance(text, str) or not text:
            continue
        batch.append(text)
        size += len(text.encode("utf-8"))
        if size >= max_bytes:
            break
    if not size:
        return float("nan")
    ids = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
    return sum(len(seq) for seq in ids) / size
