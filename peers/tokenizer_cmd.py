"""`swarm tokenizer`: train a byte-level BPE tokenizer on the user's own files (``swarm.tokenizer.train_bpe``)."""

from __future__ import annotations

import os
import sys

from peers.common import UserError, check_readable, emit


def run(args) -> int:
    from swarm.data import SHIPPED_TOKENIZER, load_texts, load_tokenizer
    from swarm.tokenizer import tokenizer_digest, tokens_per_byte, train_bpe

    check_readable(args.data, "--data")
    out = os.path.abspath(os.path.expanduser(args.out))
    if os.path.isdir(out):
        raise UserError(f"--out {args.out}: is a directory; give the tokenizer.json file to write")
    if not os.path.isdir(os.path.dirname(out)):
        raise UserError(f"--out {args.out}: the directory {os.path.dirname(out)} does not exist")
    try:
        texts = [
            t for t in load_texts(args.data, args.text_field)["text"] if isinstance(t, str) and t.strip()
        ]
        if not texts:
            raise UserError(f"no text in {' '.join(args.data)}")
        print(
            f"swarm tokenizer: training a byte-level BPE of up to {args.vocab_size} tokens on {len(texts)} "
            f"documents...",
            file=sys.stderr,
            flush=True,
        )
        text = train_bpe(texts, args.vocab_size)
    except ValueError as e:
        raise UserError(str(e)) from None
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, out)  # atomic: a reader never sees half a file
    tokenizer, shipped = load_tokenizer(out), load_tokenizer(None)
    ours, theirs = tokens_per_byte(tokenizer, texts), tokens_per_byte(shipped, texts)
    digest = tokenizer_digest(tokenizer)
    print(
        f"swarm tokenizer: wrote {out}: {len(tokenizer)} tokens, sha256 {digest[:16]}...; on your data "
        f"{ours:.3f} tokens per byte (the shipped tokenizer: {theirs:.3f})",
        flush=True,
    )
    print(
        f"swarm tokenizer: use it with `swarm dht --tokenizer {out}` (the swarm's config pins its digest) and "
        f"`swarm train --tokenizer {out}`",
        flush=True,
    )
    emit(
        "tokenizer",
        path=out,
        size=len(tokenizer),
        sha256=digest,
        tokens_per_byte=round(ours, 4),
        shipped_tokens_per_byte=round(theirs, 4),
        shipped=str(SHIPPED_TOKENIZER),
    )
    return 0
