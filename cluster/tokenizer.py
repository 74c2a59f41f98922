"""Loads a model folder's Hugging Face tokenizer from local files only, and renders a
conversation with its chat template. Runs on the driver or in the Serve replica."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError
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


def chat_token_ids(tokenizer: PreTrainedTokenizerBase | None, conversation: list[dict[str, Any]], *,
                   add_generation_prompt: bool = True, continue_final_message: bool = False,
                   chat_template_kwargs: dict[str, Any] | None = None) -> list[int]:
    """The conversation's token ids as the tokenizer's chat template renders it: the
    template's text, tokenized without adding special tokens (it has its own), as vLLM
    does. chat_template_kwargs are the template's own variables. ValueError for a model
    without a tokenizer or a chat template, or messages the template refuses; its message
    starts with the argument at fault."""
    text = chat_text(tokenizer, conversation, add_generation_prompt=add_generation_prompt,
                     continue_final_message=continue_final_message, chat_template_kwargs=chat_template_kwargs)
    return tokenizer.encode(text, add_special_tokens=False)


def chat_text(tokenizer: PreTrainedTokenizerBase | None, conversation: list[dict[str, Any]], *,
              add_generation_prompt: bool = True, continue_final_message: bool = False,
              chat_template_kwargs: dict[str, Any] | None = None) -> str:
    """The conversation as the chat template renders it, as text (chat_token_ids)."""
    if tokenizer is None:
        raise ValueError("messages need a tokenizer, and this model has none (a model shape): it has no chat template")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("messages need a chat template, and this model's tokenizer has none")
    variables = chat_template_kwargs or {}
    reserved = sorted(set(variables) & _named_arguments(tokenizer.apply_chat_template))
    if reserved:
        raise ValueError(f"chat_template_kwargs may not set {', '.join(map(repr, reserved))}: these are "
                         "apply_chat_template's own arguments, not the template's variables")
    try:
        text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             continue_final_message=continue_final_message, **variables)
    except (TemplateError, ValueError, TypeError) as exc:
        raise ValueError(f"messages: the chat template could not render them: {exc}") from None
    return text


def _named_arguments(function) -> set[str]:
    parameters = inspect.signature(function).parameters.values()
    return {p.name for p in parameters if p.kind is not inspect.Parameter.VAR_KEYWORD}
