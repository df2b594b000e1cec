"""Tokenised SFT examples in a compact form: one flat token array with offsets, built once.

Layer L1 (numpy + transformers). Example m of a store is `ids_T[offsets_M[m]:offsets_M[m + 1]]`
= `bos prompt completion eos` (no bos for a tokenizer without one), and `loss_start_M[m]` is the
first label position whose next id is a completion id (megatron_r1.data.sft has the layout).
Key decisions:
- Nothing is padded here: a store costs 4 bytes per token plus 12 per example, whatever
  data.seq_length is, and examples too long for a run are dropped when a data set is cut from
  the store (megatron_r1.data.sft), so one store serves every seq_length.
- On disk (a cache directory) a store is a directory of `ids.bin` (raw int32), `offsets.npy`,
  `loss_start.npy` and `meta.json`, opened memory-mapped: every rank of every run reading the
  same source shares one copy in the page cache and touches only the rows it trains on.
- The directory's name carries a key: a hash of everything that decides the ids (the records'
  identity, i.e. a JSONL file's path, size and modification time or a generated source's
  parameters; the template; the tokenizer's whole serialisation and its special ids; the
  store format). Any change builds a new store beside the old one instead of reusing a wrong
  one.
- Built in chunks of at most TOKENIZE_CHUNK examples and TOKENIZE_CHARS characters (memory
  bounded by a chunk, not the source) into a temporary sibling directory that is renamed into place when complete: a reader sees a
  whole store or none, and of two concurrent builders one rename wins and the other's copy is
  discarded.

Shapes: T tokens of all examples, M examples.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

STORE_FORMAT = 1
"""Version of the on-disk layout (part of the key: a new layout never reads an old store)."""
TOKENIZE_CHUNK = 1024
"""Examples tokenized per call while building at most..."""
TOKENIZE_CHARS = 1 << 20
"""...and characters (a tokenizer call holds tens of bytes per token of its output until it
returns: this bounds the builder's memory whatever the examples' lengths)."""


@dataclass(frozen=True)
class TokenStore:
    """Tokenized examples, in memory or memory-mapped from a cache directory."""

    ids_T: np.ndarray
    """int32 [T]: every example's ids, back to back."""
    offsets_M: np.ndarray
    """int64 [M + 1]: example m is ids_T[offsets_M[m]:offsets_M[m + 1]]."""
    loss_start_M: np.ndarray
    """int32 [M]: the first position whose label is a completion id (or the eos)."""
    pad_id: int
    """The tokenizer's pad id (its eos when it has none): filler of padded positions."""
    path: Path | None = None
    """The store's directory, None for one built in memory."""

    def __len__(self) -> int:
        return len(self.offsets_M) - 1

    def ids(self, record: int) -> np.ndarray:
        """int32 [ids of the example]: example `record`'s ids (a view of the store)."""
        return self.ids_T[self.offsets_M[record]:self.offsets_M[record + 1]]


def special_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], int, int]:
    """(head, eos, pad): the ids before a prompt ([bos] or none), the eos that ends every
    completion, and the pad id (eos for a tokenizer without one; padding is never in the loss).

    Raises:
        ValueError: for a tokenizer without an eos token.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no eos token; SFT needs one "
                         "to end completions")
    head = [] if tokenizer.bos_token_id is None else [int(tokenizer.bos_token_id)]
    pad = eos if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    return head, int(eos), int(pad)


def _tokenized(pairs: Sequence[tuple[str, str]], tokenizer: PreTrainedTokenizerBase,
               head: list[int], eos: int) -> tuple[np.ndarray, list[int], list[int]]:
    """(ids int32 of the pairs back to back, ids per pair, loss start per pair). Prompt and
    completion are tokenized separately, as at rollout time, so the loss boundary is exact."""
    prompts = tokenizer([p for p, _ in pairs], add_special_tokens=False)["input_ids"]
    completions = tokenizer([c for _, c in pairs], add_special_tokens=False)["input_ids"]
    sizes, starts = [], []
    for prompt_ids, completion_ids in zip(prompts, completions):
        sizes.append(len(head) + len(prompt_ids) + len(completion_ids) + 1)
        # Label j is ids[j + 1]: the first completion id is the label at position start - 1.
        starts.append(max(len(head) + len(prompt_ids) - 1, 0))
    flat = np.fromiter(itertools.chain.from_iterable(
        (*head, *p, *c, eos) for p, c in zip(prompts, completions)), dtype=np.int32,
        count=sum(sizes))
    return flat, sizes, starts


def _chunks(pairs: Iterable[tuple[str, str]]) -> Iterator[list[tuple[str, str]]]:
    """The pairs in order, cut into chunks of at most TOKENIZE_CHUNK pairs and (but for a
    single longer pair) TOKENIZE_CHARS characters."""
    chunk: list[tuple[str, str]] = []
    chars = 0
    for pair in pairs:
        size = len(pair[0]) + len(pair[1])
        if chunk and (len(chunk) == TOKENIZE_CHUNK or chars + size > TOKENIZE_CHARS):
            yield chunk
            chunk, chars = [], 0
        chunk.append(pair)
        chars += size
    if chunk:
        yield chunk


def tokenize_pairs(pairs: Iterable[tuple[str, str]],
                   tokenizer: PreTrainedTokenizerBase) -> TokenStore:
    """An in-memory store of (templated prompt, completion) pairs, in order.

    Raises:
        ValueError: for a tokenizer without an eos token.
    """
    head, eos, pad = special_ids(tokenizer)
    parts, sizes, starts = [], [0], []
    for chunk in _chunks(pairs):
        flat, chunk_sizes, chunk_starts = _tokenized(chunk, tokenizer, head, eos)
        parts.append(flat)
        sizes += chunk_sizes
        starts += chunk_starts
    ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    return TokenStore(ids_T=ids, offsets_M=np.cumsum(sizes, dtype=np.int64),
                      loss_start_M=np.asarray(starts, dtype=np.int32), pad_id=pad)


def from_sequences(ids: Sequence[Sequence[int]], loss_start: Sequence[int],
                   pad_id: int) -> TokenStore:
    """An in-memory store of given id sequences (each `bos prompt completion eos`) and the
    first position of each one's loss."""
    sizes = [len(x) for x in ids]
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=sum(sizes))
    return TokenStore(ids_T=flat, offsets_M=np.cumsum([0, *sizes], dtype=np.int64),
                      loss_start_M=np.asarray(loss_start, dtype=np.int32), pad_id=pad_id)


# ----------------------------------------------------------------------------- on disk


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of what decides a tokenizer's ids: its whole serialisation (a fast tokenizer's
    tokenizer.json, else its vocabulary) and its special ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(
        sorted(tokenizer.get_vocab().items()))
    digest = hashlib.sha256(text.encode("utf-8"))
    digest.update(json.dumps([type(tokenizer).__name__, tokenizer.bos_token_id,
                              tokenizer.eos_token_id, tokenizer.pad_token_id]).encode())
    return digest.hexdigest()


def file_identity(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A file's identity in a store key: its absolute path, size and modification time (an
    edited or replaced file has another; the contents are not hashed, which would read the
    whole file on every start)."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return {"path": str(resolved), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def store_key(identity: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase) -> str:
    """The key of the store of `identity`'s records under `tokenizer` (hex, 24 digits)."""
    text = json.dumps({"format": STORE_FORMAT, "records": identity,
                       "tokenizer": tokenizer_fingerprint(tokenizer)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def open_store(path: str | os.PathLike[str]) -> TokenStore:
    """A store directory, memory-mapped read-only.

    Raises:
        ValueError: naming the directory when it is not a complete store of this format.
    """
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a token store ({err})") from None
    if meta.get("format") != STORE_FORMAT:
        raise ValueError(f"{path}: token store format {meta.get('format')}, this version reads "
                         f"{STORE_FORMAT}")
    tokens = int(meta["tokens"])
    # np.memmap refuses an empty file (a store of no records)
    ids = (np.memmap(path / "ids.bin", dtype=np.int32, mode="r", shape=(tokens,)) if tokens
           else np.zeros(0, dtype=np.int32))
    return TokenStore(ids_T=ids, offsets_M=np.load(path / "offsets.npy", mmap_mode="r"),
                      loss_start_M=np.load(path / "loss_start.npy", mmap_mode="r"),
                      pad_id=int(meta["pad_id"]), path=path)


def _write(directory: Path, pairs: Iterable[tuple[str, str]],
           tokenizer: PreTrainedTokenizerBase, describe: Mapping[str, Any]) -> None:
    """Tokenize `pairs` chunk by chunk into `directory` (which exists and is empty)."""
    head, eos, pad = special_ids(tokenizer)
    offsets, starts, total = [0], [], 0
    with open(directory / "ids.bin", "wb") as out:
        for chunk in _chunks(pairs):
            flat, sizes, chunk_starts = _tokenized(chunk, tokenizer, head, eos)
            out.write(flat.tobytes())
            for size in sizes:
                total += size
                offsets.append(total)
            starts += chunk_starts
    np.save(directory / "offsets.npy", np.asarray(offsets, dtype=np.int64))
    np.save(directory / "loss_start.npy", np.asarray(starts, dtype=np.int32))
    (directory / "meta.json").write_text(json.dumps(
        {"format": STORE_FORMAT, "tokens": total, "records": len(starts), "pad_id": pad,
         "describe": dict(describe)}, indent=1) + "\n")


def cached_store(cache_dir: str | os.PathLike[str], name: str, identity: Mapping[str, Any],
                 pairs: Callable[[], Iterable[tuple[str, str]]],
                 tokenizer: PreTrainedTokenizerBase) -> TokenStore:
    """The store of `identity`'s records under `tokenizer` in `cache_dir`: opened when it
    exists, else built from `pairs()` (called only then) and renamed into place.

    Args:
        name: Readable prefix of the directory name (e.g. the file's stem).
        identity: What decides the records (file_identity, a generated source's parameters,
            the template); JSON-serialisable.
        pairs: (templated prompt, completion) of every record, in order.

    Raises:
        ValueError: from reading the records (file:line errors), or for a tokenizer without
            an eos token.
    """
    cache_dir = Path(cache_dir)
    path = cache_dir / f"{name}-{store_key(identity, tokenizer)}"
    if (path / "meta.json").is_file():
        return open_store(path)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=cache_dir))
    try:
        _write(tmp, pairs(), tokenizer, identity)
        try:
            os.rename(tmp, path)
        except OSError:  # another builder renamed its complete copy first: use that one
            if not (path / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return open_store(path)
