"""A checkpoint root's `hf_assets/`: the tokenizer and generation files of its model.

Layer L2 by package; plain files (no megatron; transformers only where a tokenizer is saved),
so `convert` imports it freely. `convert mcore-to-hf` copies `<root>/hf_assets/` next to the
exported weights, which makes the export a complete Hugging Face directory. Key decision: a
root gets its assets once and keeps them: a training run copies those of the checkpoint it
started from (a converted Hugging Face model, or another run), so a chain HF -> SFT -> GRPO
keeps the original tokenizer, chat template and generation config to the end; a run with no
such assets writes its own tokenizer. Written into a temporary sibling and renamed into
place, so a reader (or a concurrent run) never sees half a directory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

ASSETS_DIR = "hf_assets"


def write_assets(root: str | os.PathLike[str], *, copy_from: str | os.PathLike[str] | None,
                 tokenizer: Any | None) -> Path | None:
    """Give checkpoint root `root` its `hf_assets/` unless it has them already.

    Args:
        copy_from: another root's `hf_assets/`, copied as is if it exists.
        tokenizer: a Hugging Face tokenizer, saved (save_pretrained, plus a
            generation_config.json with its bos/eos/pad ids) when there is nothing to copy.

    Returns:
        The root's `hf_assets/`, or None if it has none and there was nothing to write.
    """
    target = Path(root) / ASSETS_DIR
    if target.is_dir():
        return target
    source = Path(copy_from) if copy_from is not None else None
    if (source is None or not source.is_dir()) and tokenizer is None:
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{ASSETS_DIR}.partial-", dir=target.parent))
    try:
        if source is not None and source.is_dir():
            shutil.copytree(source, tmp, dirs_exist_ok=True)
        else:
            _save_tokenizer(tokenizer, tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not target.is_dir():
                raise
            # Another process published its copy first: keep that one.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _save_tokenizer(tokenizer: Any, directory: Path) -> None:
    """The tokenizer files, and the special token ids where `generate` looks for them (the
    exported config.json, derived from the model config, does not name them)."""
    from transformers import GenerationConfig  # imported here: `convert` need not load it

    from megatron_r1.data.tokenizer import save_tokenizer

    save_tokenizer(tokenizer, directory)
    ids = {f"{k}_token_id": getattr(tokenizer, f"{k}_token_id", None)
           for k in ("bos", "eos", "pad")}
    GenerationConfig(**{k: v for k, v in ids.items() if v is not None}).save_pretrained(directory)
