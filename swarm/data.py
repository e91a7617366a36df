"""Training data: the tokenizer, a corpus cut into fixed-length token blocks, and a deterministic micro-batch stream.

The package ships a small synthetic English corpus and a 4096-entry byte-level BPE tokenizer (both built by
``scripts/build_assets.py``), so training works with no network and no user data.  Users can point
:class:`~swarm.config.DataConfig` at their own local ``.txt``/``.md``/``.jsonl``/``.json``/``.parquet`` files and
their own tokenizer (a local tokenizer directory or a ``tokenizer.json`` file).

Files are read through the ``datasets`` library, so large corpora are memory-mapped and their tokenization is
cached on disk (in the usual ``datasets`` cache); nothing is ever fetched from a hub: this module switches the
Hugging Face libraries to offline mode unless the environment already says otherwise.

* :func:`load_tokenizer` -- the shipped tokenizer or a user's local one.
* :func:`load_token_blocks` -- documents -> tokens (+ one eos after each document) -> ``[num_blocks, seq_len]``.
* :class:`MicroBatchStream` -- micro-batch ``i`` of an endless, epoch-wise shuffled stream of those blocks; every
  process that holds the same blocks computes the same micro-batch for the same index.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
import operator
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets  # noqa: E402  (imported after the offline switches above)
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from swarm.config import DataConfig  # noqa: E402
from swarm.tokenizer import tokenizer_digest  # noqa: E402

logger = logging.getLogger(__name__)

ASSETS_DIR = Path(__file__).parent / "assets"
SHIPPED_CORPUS: Path = ASSETS_DIR / "corpus.jsonl"
SHIPPED_TOKENIZER: Path = ASSETS_DIR / "tokenizer.json"
EOS_TOKEN = "<|endoftext|>"

# file extension -> name of the ``datasets`` packaged builder that reads it
_KIND_BY_SUFFIX: Dict[str, str] = {
    ".txt": "text",
    ".md": "text",
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
}
# tokens tried, in order, as the document separator for a user tokenizer that declares no eos token
_EOS_CANDIDATES = (EOS_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "[SEP]")
_STRING_DTYPES = ("string", "large_string")
_TOKENS_VERSION = "swarm-data-v1"  # bump when the tokenization recipe changes, to invalidate datasets caches

_MEMO: "OrderedDict[Tuple, torch.Tensor]" = OrderedDict()
_MEMO_MAX = 4
_MEMO_LOCK = threading.Lock()


# ----------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------


def load_tokenizer(path: Optional[str] = None) -> transformers.PreTrainedTokenizerFast:
    """Load a fast tokenizer from local files only.

    Args:
        path: ``None`` for the shipped 4096-entry byte-level BPE (``<|endoftext|>`` is its bos, eos and pad
            token); a local tokenizer directory (anything ``AutoTokenizer.from_pretrained`` reads, e.g. one made
            by ``save_pretrained``); or a ``tokenizer.json`` file.

    Returns:
        The tokenizer.  If it declares no eos token but has a well-known end-of-text token in its vocabulary,
        that token becomes its eos; if it has no pad token, its eos doubles as pad.

    Raises:
        ValueError: the path does not exist or holds no loadable tokenizer.
    """
    if path is None:
        tokenizer = transformers.PreTrainedTokenizerFast(
            tokenizer_file=str(SHIPPED_TOKENIZER),
            bos_token=EOS_TOKEN,
            eos_token=EOS_TOKEN,
            pad_token=EOS_TOKEN,
        )
        tokenizer.name_or_path = str(SHIPPED_TOKENIZER)
        return tokenizer

    location = Path(os.path.expanduser(str(path)))
    if not location.exists():
        raise ValueError(
            f"tokenizer path does not exist: {str(path)!r} (expected a local tokenizer directory "
            f"or a tokenizer.json file; nothing is downloaded)"
        )
    try:
        if location.is_dir():
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(location), local_files_only=True)
        elif location.suffix.lower() == ".json":
            tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(location))
            tokenizer.name_or_path = str(location)
        else:
            raise ValueError("not a .json file")
    except Exception as error:  # transformers raises OSError, ValueError, json and Rust errors here
        raise ValueError(f"could not load a tokenizer from {str(path)!r}: {error}") from error
    _fill_special_tokens(tokenizer)
    logger.info("loaded tokenizer from %s (%d entries)", location, len(tokenizer))
    return tokenizer


def _fill_special_tokens(tokenizer) -> None:
    if tokenizer.eos_token is None:
        vocab = tokenizer.get_vocab()
        for candidate in _EOS_CANDIDATES:
            if candidate in vocab:
                tokenizer.eos_token = candidate
                logger.info("tokenizer declares no eos token; using %r", candidate)
                break
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token


def vocab_size(tokenizer) -> int:
    """Number of distinct token ids the tokenizer can produce, added tokens included (``len(tokenizer)``)."""
    return len(tokenizer)


# ----------------------------------------------------------------------------------------------------------
# Corpus -> token blocks
# ----------------------------------------------------------------------------------------------------------


def _resolve_files(paths: Sequence[str]) -> List[Path]:
    """Expand directories (recursively, sorted, hidden entries skipped) and check every file exists and is readable."""
    files: List[Path] = []
    for raw in paths:
        path = Path(os.path.expanduser(str(raw)))
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix.lower() in _KIND_BY_SUFFIX
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                raise ValueError(
                    f"data directory {str(raw)!r} holds no {'/'.join(sorted(_KIND_BY_SUFFIX))} files"
                )
            files.extend(found)
        elif path.is_file():
            if path.suffix.lower() not in _KIND_BY_SUFFIX:
                raise ValueError(
                    f"unsupported data file extension {path.suffix or '(none)'!r} for {str(raw)!r}; "
                    f"supported: {', '.join(sorted(_KIND_BY_SUFFIX))}"
                )
            files.append(path)
        else:
            raise ValueError(f"data file not found: {str(raw)!r}")
    return [f.resolve() for f in files]


def _diagnose(kind: str, files: Sequence[str]) -> Optional[str]:
    """What is wrong with the first bad file of ``files`` (of ``kind``), naming it and the line or byte, or None
    if none of these checks finds it. Runs only after a load failed, so a good corpus costs nothing."""
    for name in files:
        try:
            if os.path.getsize(name) == 0:
                return f"data file {name} is empty"
            if kind == "parquet":
                import pyarrow.parquet as pq

                try:
                    pq.read_metadata(name)
                except Exception as e:
                    return f"data file {name} is not a parquet file ({' '.join(str(e).split())})"
                continue
            with open(name, "rb") as f:
                offset, line_no, blank, decoder = 0, 0, True, codecs.getincrementaldecoder("utf-8")()
                for raw in f:
                    line_no += 1
                    try:
                        text = decoder.decode(raw)
                    except UnicodeDecodeError as e:
                        return (
                            f"data file {name}: byte {offset + e.start} (line {line_no}) is not UTF-8 text; "
                            f"is it a binary file?"
                        )
                    offset += len(raw)
                    blank = blank and not text.strip()
                    if kind == "json" and text.strip():
                        try:
                            row = json.loads(text)
                        except json.JSONDecodeError as e:
                            return f"data file {name}: line {line_no} is not valid JSON ({e.msg}, column {e.colno})"
                        if not isinstance(row, dict):
                            return f"data file {name}: line {line_no} is a JSON {type(row).__name__}, not an object"
            if blank:
                return f"data file {name} holds only whitespace"
        except OSError as e:
            return f"cannot read data file {name}: {e.strerror or e}"
    return None


def _load_texts(files: Sequence[Path], text_field: str) -> datasets.Dataset:
    """One dataset with a single string column ``text``: the files of each kind loaded together, in order of
    first appearance of their kind, then concatenated."""
    by_kind: "OrderedDict[str, List[str]]" = OrderedDict()
    for f in files:
        by_kind.setdefault(_KIND_BY_SUFFIX[f.suffix.lower()], []).append(str(f))
    parts = []
    for kind, kind_files in by_kind.items():
        kwargs = {"sample_by": "paragraph"} if kind == "text" else {}
        try:
            ds = datasets.load_dataset(kind, data_files=kind_files, split="train", **kwargs)
        except (
            Exception
        ) as error:  # malformed json/parquet, unreadable files, ... (datasets says only "An error
            # occurred while generating the dataset"): find the file and the line or byte, then say that
            raise ValueError(
                _diagnose(kind, kind_files) or f"could not read {kind} data from {kind_files}: {error}"
            ) from error
        column = "text" if kind == "text" else text_field
        if column not in ds.column_names:
            raise ValueError(
                f"text column {column!r} not found in {kind_files}; columns present: {ds.column_names} "
                f"(set data.text_field to the column that holds the text)"
            )
        feature = ds.features[column]
        if getattr(feature, "dtype", None) not in _STRING_DTYPES:
            raise ValueError(f"column {column!r} in {kind_files} holds {feature}, not strings")
        nulls = ds.data.column(column).null_count
        if nulls:
            logger.warning(
                f"{nulls} of {len(ds)} rows of {', '.join(kind_files)} have no {column!r} (null): skipped"
            )
        ds = ds.select_columns([column])
        if column != "text":
            ds = ds.rename_column(column, "text")
        parts.append(ds)
    if len(parts) == 1:
        return parts[0]
    if len({ds.features["text"].dtype for ds in parts}) > 1:  # e.g. parquet written by pandas is large_string
        parts = [
            ds
            if ds.features["text"].dtype == "large_string"
            else ds.cast_column("text", datasets.Value("large_string"))
            for ds in parts
        ]
    return datasets.concatenate_datasets(parts)


def load_texts(paths: Sequence[str], text_field: str = "text") -> datasets.Dataset:
    """The documents of local files (or directories of them) as a dataset with one string column ``text``, read
    as :func:`load_token_blocks` reads them (errors name the file and the line or byte)."""
    return _load_texts(_resolve_files(paths), text_field)


def _tokenize(ds: datasets.Dataset, tokenizer, eos_id: int, tokenizer_fp: str) -> np.ndarray:
    """All documents' token ids, each document followed by ``eos_id``, as one flat int64 array.

    Empty and whitespace-only documents are skipped.
    """

    def encode(batch: Dict[str, list]) -> Dict[str, list]:
        texts = [t if isinstance(t, str) and t.strip() else "" for t in batch["text"]]
        ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        return {"input_ids": [seq + [eos_id] if text else [] for seq, text in zip(ids, texts, strict=True)]}

    source_fp = getattr(ds, "_fingerprint", None)
    new_fp = None
    if source_fp:
        new_fp = hashlib.sha256(
            f"{_TOKENS_VERSION}|{source_fp}|{tokenizer_fp}|{eos_id}".encode()
        ).hexdigest()[:16]
    tokens = ds.map(
        encode,
        batched=True,
        remove_columns=ds.column_names,
        features=datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))}),
        new_fingerprint=new_fp,
        desc="tokenizing",
    )
    column = tokens.with_format("arrow")[:]["input_ids"]
    chunks = [chunk.flatten().to_numpy(zero_copy_only=False) for chunk in column.chunks]
    flat = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int32)
    return flat.astype(np.int64, copy=False)


def load_token_blocks(cfg: DataConfig, tokenizer=None) -> torch.LongTensor:
    """Tokenize the corpus and cut it into non-overlapping blocks of ``cfg.seq_len`` tokens.

    Reads ``cfg.paths`` (files or directories; the shipped corpus when empty) through ``datasets.load_dataset``:
    ``.txt``/``.md`` files as text, one document per blank-line-separated paragraph; ``.jsonl``/``.json`` and
    ``.parquet`` files as tables whose ``cfg.text_field`` column holds one document per row.  Kinds may be mixed.
    Every document is tokenized (without special tokens) and followed by the eos token; the documents are
    concatenated in order and the tail that does not fill a whole block is dropped.

    Results are memoised per process (the same files, unchanged on disk, with the same text field, tokenizer and
    ``seq_len`` give back the same tensor object -- treat it as read-only), and the tokenization is cached on disk
    by ``datasets``.

    Args:
        cfg: the data config.
        tokenizer: the tokenizer to use; ``None`` loads ``cfg.tokenizer`` with :func:`load_tokenizer`.

    Returns:
        int64 tensor of shape ``[num_blocks, cfg.seq_len]``.

    Raises:
        ValueError: missing files, an unsupported extension, a missing or non-string text column, a tokenizer
            without an eos token, or a corpus too small to fill one block.
    """
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.tokenizer)
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no eos token to separate documents; "
            f"set tokenizer.eos_token first"
        )
    files = _resolve_files(cfg.paths) if cfg.paths else [SHIPPED_CORPUS.resolve()]
    if not cfg.paths and not SHIPPED_CORPUS.is_file():
        raise ValueError(f"the shipped corpus is missing at {SHIPPED_CORPUS}; run scripts/build_assets.py")
    tokenizer_fp = tokenizer_digest(tokenizer)
    file_keys = tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files)
    key = (file_keys, cfg.text_field, cfg.seq_len, tokenizer_fp, int(eos_id))
    with _MEMO_LOCK:
        if key in _MEMO:
            _MEMO.move_to_end(key)
            return _MEMO[key]

    texts = _load_texts(files, cfg.text_field)
    flat = _tokenize(texts, tokenizer, int(eos_id), tokenizer_fp)
    num_blocks = len(flat) // cfg.seq_len
    if num_blocks < 1:
        raise ValueError(
            f"the corpus ({len(files)} file(s), {texts.num_rows} document(s)) has only {len(flat)} tokens "
            f"including one eos per document, fewer than data.seq_len={cfg.seq_len}; add more text or "
            f"lower data.seq_len"
        )
    blocks = torch.from_numpy(
        np.ascontiguousarray(flat[: num_blocks * cfg.seq_len]).reshape(num_blocks, cfg.seq_len)
    )
    logger.info(
        "data: %d file(s), %d documents, %d tokens -> %d blocks of %d (%d tail tokens dropped)",
        len(files),
        texts.num_rows,
        len(flat),
        num_blocks,
        cfg.seq_len,
        len(flat) - num_blocks * cfg.seq_len,
    )
    with _MEMO_LOCK:
        _MEMO[key] = blocks
        while len(_MEMO) > _MEMO_MAX:
            _MEMO.popitem(last=False)
    return blocks


# ----------------------------------------------------------------------------------------------------------
# Deterministic micro-batches
# ----------------------------------------------------------------------------------------------------------

_MASK64 = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The SplitMix64 finaliser on a uint64 array: a bijection, identical on every platform and library version."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _epoch_permutation(num_blocks: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of ``range(num_blocks)`` that depends only on (num_blocks, seed, epoch).

    Blocks are sorted by a keyed hash of their index.  The hash is a bijection on 64-bit integers, so keys never
    tie, and it does not depend on the torch or numpy random generators (which may change between versions that
    different peers run).
    """
    key = _splitmix64(np.array([seed & _MASK64], dtype=np.uint64))
    key = _splitmix64(key ^ np.array([epoch & _MASK64], dtype=np.uint64))
    hashes = _splitmix64(np.arange(num_blocks, dtype=np.uint64) ^ key)
    return np.argsort(hashes, kind="stable")


class MicroBatchStream:
    """Micro-batch ``index`` of an endless stream of shuffled epochs over ``blocks``, computable in any order.

    The stream is epoch 0, epoch 1, ... back to back, each epoch a permutation of all blocks seeded by
    ``(seed, epoch)``.  Micro-batch ``i`` is positions ``[i * microbatch_size, (i + 1) * microbatch_size)`` of
    that stream, so a micro-batch that reaches past the end of an epoch continues with the first blocks of the
    next one, and every block appears exactly once per epoch.  The result depends only on (blocks,
    microbatch_size, seed, index): every process, peer or restart computes the same micro-batch.
    """

    _PERM_CACHE = 4  # epochs whose permutation is kept

    def __init__(self, blocks: torch.Tensor, microbatch_size: int, seed: int = 0) -> None:
        """
        Args:
            blocks: ``[num_blocks, seq_len]`` token ids, e.g. from :func:`load_token_blocks`.
            microbatch_size: sequences per micro-batch (may exceed ``num_blocks``; blocks then repeat across epochs).
            seed: the shuffle seed.
        """
        if not isinstance(blocks, torch.Tensor) or blocks.dim() != 2:
            raise ValueError(
                f"blocks must be a 2-D tensor [num_blocks, seq_len], got "
                f"{tuple(blocks.shape) if isinstance(blocks, torch.Tensor) else type(blocks).__name__}"
            )
        if blocks.shape[0] < 1 or blocks.shape[1] < 1:
            raise ValueError(
                f"blocks must hold at least one non-empty block, got shape {tuple(blocks.shape)}"
            )
        microbatch_size = operator.index(microbatch_size)
        if microbatch_size < 1:
            raise ValueError(f"microbatch_size must be >= 1, got {microbatch_size}")
        self.blocks = blocks
        self.microbatch_size = microbatch_size
        self.seed = operator.index(seed)
        self._perms: "OrderedDict[int, np.ndarray]" = OrderedDict()
        self._lock = threading.Lock()

    @property
    def num_blocks(self) -> int:
        """Blocks per epoch."""
        return int(self.blocks.shape[0])

    @property
    def seq_len(self) -> int:
        """Tokens per sequence."""
        return int(self.blocks.shape[1])

    @property
    def microbatches_per_epoch(self) -> int:
        """Micro-batches it takes to cover one epoch: ``ceil(num_blocks / microbatch_size)``.

        When ``microbatch_size`` does not divide ``num_blocks`` epochs straddle micro-batches; use
        :meth:`epoch_of` for the exact epoch of a micro-batch.
        """
        return -(-self.num_blocks // self.microbatch_size)

    @property
    def tokens_per_microbatch(self) -> int:
        """``microbatch_size * seq_len``."""
        return self.microbatch_size * self.seq_len

    def epoch_of(self, index: int) -> int:
        """The epoch that the first sequence of micro-batch ``index`` belongs to."""
        return operator.index(index) * self.microbatch_size // self.num_blocks

    def block_indices(self, index: int) -> torch.LongTensor:
        """Row numbers into ``blocks`` that make up micro-batch ``index``."""
        index = operator.index(index)
        if index < 0:
            raise ValueError(f"micro-batch index must be >= 0, got {index}")
        start = index * self.microbatch_size
        positions = np.arange(start, start + self.microbatch_size, dtype=np.int64)
        epochs, offsets = np.divmod(positions, self.num_blocks)
        rows = np.empty(self.microbatch_size, dtype=np.int64)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            rows[mask] = self._permutation(int(epoch))[offsets[mask]]
        return torch.from_numpy(rows)

    def microbatch(self, index: int) -> torch.LongTensor:
        """Micro-batch number ``index`` (``>= 0``): a new ``[microbatch_size, seq_len]`` tensor on ``blocks``' device."""
        rows = self.block_indices(index)
        return self.blocks.index_select(0, rows.to(self.blocks.device))

    def _permutation(self, epoch: int) -> np.ndarray:
        with self._lock:
            perm = self._perms.get(epoch)
            if perm is None:
                perm = _epoch_permutation(self.num_blocks, self.seed, epoch)
                self._perms[epoch] = perm
                while len(self._perms) > self._PERM_CACHE:
                    self._perms.popitem(last=False)
            else:
                self._perms.move_to_end(epoch)
            return perm

    def __repr__(self) -> str:
        return (
            f"MicroBatchStream(num_blocks={self.num_blocks}, seq_len={self.seq_len}, "
            f"microbatch_size={self.microbatch_size}, seed={self.seed})"
        )
