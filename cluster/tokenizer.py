"""Loads a model folder's Hugging Face tokenizer from local files only. Runs on the driver."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def load_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerBase | None:
    """The folder's tokenizer, or None when it has no tokenizer files (a model shape for
    dummy weights: token-id and embedding prompts still work, text prompts do not)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ValueError(f"model folder {model_dir} does not exist")
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        return None
    # local_files_only: a folder path must never turn into a hub download.
    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
