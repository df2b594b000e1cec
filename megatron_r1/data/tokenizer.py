"""The project's own tokenizer for the arithmetic task: built in a second, saved in HF format.

Layer L1 (tokenizers + transformers). Key decisions:
- Byte-level BPE over the whole text, not word by word: the only pre-tokenizer split isolates
  every digit (so each digit is one token and numbers are spelled out digit by digit), and
  merges may cross spaces. The R1-Zero template, identical in every prompt, then shrinks to
  about 20 tokens, which leaves room for question and reasoning in 128-token sequences; an
  operator with its spaces (" + ", ") * (") becomes one token. All 256 bytes are in the
  alphabet, so any text encodes and decodes losslessly.
- The four tags <think> </think> <answer> </answer> are added tokens (always one token each,
  never skipped on decode), as in DeepSeek's and Qwen's tokenizers: the format reward and the
  model's stop behaviour depend on them.
- bos, eos and pad are special tokens; the post-processor prepends bos, so a rollout engine
  that tokenizes a prompt string (vLLM) gets the same ids as SFT's `bos + prompt`.
- The directory is a standard PreTrainedTokenizerFast one (tokenizer.json,
  tokenizer_config.json, special_tokens_map.json) that AutoTokenizer and vLLM load; it is
  written to a temporary sibling and renamed into place, so readers never see half of it.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from megatron_r1.config.schema import DataConfig
from megatron_r1.data.arithmetic import make_splits, write_solution
from megatron_r1.data.template import render_prompt

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<bos>"
EOS_TOKEN = "<eos>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)
"""Special tokens, ids 0, 1, 2 in this order."""

TAG_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")
"""The R1 format tags, added as single (non-special) tokens at the end of the vocabulary."""

DEFAULT_TOKENIZER_SEED = 0
"""Seed of the training corpus. The tokenizer is part of a model's identity (checkpoints,
the rollout engine): keep it fixed rather than tying it to train.seed."""

MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS) + len(TAG_TOKENS)
"""All bytes, the special tokens and the tags; merges need more."""

# The corpus: enough problems to see every operator/parenthesis pattern of up to 4 operations.
_CORPUS_PROBLEMS = 2000
_CORPUS_MAX_OPS = 4
_CORPUS_MAX_OPERAND = 50

_TAG_SPLIT = re.compile("(" + "|".join(re.escape(tag) for tag in TAG_TOKENS) + ")")


def _corpus(seed: int) -> list[str]:
    """Training text cut as the encoder cuts it: added tokens split the text into pieces."""
    problems = make_splits(num_train=_CORPUS_PROBLEMS, num_eval=0, min_ops=1,
                           max_ops=_CORPUS_MAX_OPS, max_operand=_CORPUS_MAX_OPERAND,
                           seed=seed).train
    texts = []
    for problem in problems:
        texts += [render_prompt(problem.question, "r1_zero"), problem.question,
                  write_solution(problem)]
    return [piece for text in texts for piece in _TAG_SPLIT.split(text)
            if piece and piece not in TAG_TOKENS]


def _train_backend(vocab_size: int, seed: int) -> Tokenizer:
    """Train the byte-level BPE; the tags take the last len(TAG_TOKENS) ids."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level])
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(TAG_TOKENS), special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=alphabet, limit_alphabet=len(alphabet), show_progress=False)
    tokenizer.train_from_iterator(_corpus(seed), trainer)
    tokenizer.add_tokens([AddedToken(tag, special=False, normalized=False) for tag in TAG_TOKENS])
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B", special_tokens=[(BOS_TOKEN, bos_id)])
    return tokenizer


def _wrap(backend: Tokenizer) -> PreTrainedTokenizerFast:
    # Spaces around operators and tags are content: never "clean them up" on decode.
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN, clean_up_tokenization_spaces=False, padding_side="right")


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, directory: str | Path) -> None:
    """save_pretrained plus the files older transformers and vLLM look for (any tokenizer:
    the built-in one, or one saved with a checkpoint for its Hugging Face export)."""
    directory = Path(directory)
    tokenizer.save_pretrained(directory)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    # transformers 5 names a plain `tokenizers`-backed tokenizer "TokenizersBackend"; 4.x only
    # knows this name for it.
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    special = directory / "special_tokens_map.json"
    if not special.exists():  # transformers 5 no longer writes it
        special.write_text(json.dumps(tokenizer.special_tokens_map, indent=2, default=str) + "\n")


def build_arithmetic_tokenizer(out_dir: str | Path, vocab_size: int,
                               seed: int = DEFAULT_TOKENIZER_SEED) -> PreTrainedTokenizerFast:
    """Train the arithmetic-task tokenizer and save it as a Hugging Face tokenizer directory.

    Deterministic: the same (vocab_size, seed) gives byte-identical files. Idempotent and safe
    when several ranks build at once: if `out_dir` already holds the identical tokenizer it is
    kept; if it holds anything else, nothing is overwritten.

    Args:
        out_dir: Directory to create (its parent is created if missing).
        vocab_size: Upper bound on the vocabulary (model.vocab_size); the trainer stops early
            when the corpus has no pair left to merge, so the result may be smaller.
        seed: Seed of the generated training corpus.

    Returns:
        The tokenizer, equal to `load_tokenizer(out_dir)`.

    Raises:
        ValueError: if vocab_size < MIN_VOCAB_SIZE, or `out_dir` exists with other content.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size={vocab_size}: the byte-level tokenizer needs at least {MIN_VOCAB_SIZE} "
            f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens + {len(TAG_TOKENS)} tags), "
            "and more for merges")
    out_dir = Path(out_dir)
    tokenizer = _wrap(_train_backend(vocab_size, seed))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        save_tokenizer(tokenizer, tmp_dir)
        if not out_dir.exists():
            try:
                tmp_dir.rename(out_dir)
                return tokenizer
            except OSError:
                if not out_dir.exists():
                    raise
                # Another process renamed its (identical, if deterministic) copy first.
        existing = out_dir / "tokenizer.json"
        if not (existing.is_file()
                and existing.read_bytes() == (tmp_dir / "tokenizer.json").read_bytes()):
            raise ValueError(
                f"{out_dir} already exists and does not hold the arithmetic tokenizer with "
                f"vocab_size={vocab_size}, seed={seed}: remove it or choose another directory")
        return tokenizer
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a Hugging Face tokenizer directory (never the hub).

    Args:
        path: A directory with tokenizer.json / tokenizer_config.json.

    Returns:
        The tokenizer AutoTokenizer makes of it.

    Raises:
        ValueError: naming `path`, if it is missing, not a directory, or not loadable.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"tokenizer directory {path} does not exist")
    if not path.is_dir():
        raise ValueError(f"tokenizer path {path} is not a directory")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as err:  # transformers raises OSError, ValueError, KeyError, json errors
        raise ValueError(
            f"cannot load a tokenizer from {path}: {type(err).__name__}: {err}") from err


def resolve_tokenizer(data: DataConfig, *, vocab_size: int,
                      cache_dir: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer a run uses: data.tokenizer, or the arithmetic one built into cache_dir.

    Args:
        data: Uses data.tokenizer (None: build the project's own).
        vocab_size: model.vocab_size; the tokenizer must fit in it.
        cache_dir: Where the built tokenizer goes (`<cache_dir>/tokenizer`), e.g. the run
            directory, so that the rollout engine and HF exports can load it from there.

    Returns:
        The tokenizer.

    Raises:
        ValueError: if the tokenizer cannot be loaded or has more tokens than vocab_size.
    """
    if data.tokenizer is not None:
        tokenizer = load_tokenizer(data.tokenizer)
        source = f"data.tokenizer={data.tokenizer!r}"
    else:
        tokenizer = build_arithmetic_tokenizer(Path(cache_dir) / "tokenizer", vocab_size)
        source = "the built-in arithmetic tokenizer"
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"model.vocab_size={vocab_size}: smaller than the {len(tokenizer)} tokens of "
            f"{source}")
    return tokenizer
