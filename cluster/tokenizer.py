"""Loads a model folder's Hugging Face tokenizer from local files only, and renders a
conversation with its chat template. Runs on the driver or in the Serve replica."""

from __future__ import annotations

import inspect
import uuid
from collections.abc import Sequence
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


def chat_prompt(tokenizer: PreTrainedTokenizerBase | None, conversation: list[dict[str, Any]],
                rows_per_part: Sequence[int] = (), *, add_generation_prompt: bool = True,
                continue_final_message: bool = False, chat_template_kwargs: dict[str, Any] | None = None
                ) -> tuple[list[int], tuple[tuple[int, int], ...]]:
    """The conversation's token ids as the tokenizer's chat template renders it (the
    template's text, tokenized without adding special tokens: it has its own, as vLLM
    does), and the positions [start, end) its prompt_embeds parts' rows fill, in order.

    A message's content is a string, or a list of parts joined by newlines, as vLLM joins
    them: {"type": "text", "text": ...} or {"type": "prompt_embeds", ...}, the i-th of
    rows_per_part[i] rows, whose positions hold placeholder ids (0). The template renders a
    marker of the call's own in each such part's place; the text between markers is
    tokenized piece by piece. chat_template_kwargs are the template's own variables.
    ValueError for a model without a tokenizer or a chat template, or messages the
    template refuses (or renders without a part, or with one twice); its message starts
    with the argument at fault."""
    marker = f"\x00shardserve-embeds-{uuid.uuid4().hex}\x00"
    flattened = [{**message, "content": _content_text(message.get("content"), marker)} for message in conversation]
    text = chat_text(tokenizer, flattened, add_generation_prompt=add_generation_prompt,
                     continue_final_message=continue_final_message, chat_template_kwargs=chat_template_kwargs)
    pieces = text.split(marker)
    if len(pieces) != len(rows_per_part) + 1:
        raise ValueError(f"messages: the chat template rendered {len(pieces) - 1} of the {len(rows_per_part)} "
                         "prompt_embeds parts (it drops or repeats some content)")
    ids, spans = tokenizer.encode(pieces[0], add_special_tokens=False), []
    for rows, piece in zip(rows_per_part, pieces[1:]):
        spans.append((len(ids), len(ids) + rows))
        ids += [0] * rows + tokenizer.encode(piece, add_special_tokens=False)
    return ids, tuple(spans)


def _content_text(content, marker: str):
    """A message's content as the template gets it: parts joined by newlines, `marker` in
    each prompt_embeds part's place; a string (or null) as it is."""
    if not isinstance(content, list):
        return content
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            texts.append(part["text"])
        elif kind == "prompt_embeds":
            texts.append(marker)
        else:
            raise ValueError(f"messages: content parts of type {kind!r} are not supported; "
                             "only 'text' and 'prompt_embeds' parts are")
    return "\n".join(texts)


def chat_text(tokenizer: PreTrainedTokenizerBase | None, conversation: list[dict[str, Any]], *,
              add_generation_prompt: bool = True, continue_final_message: bool = False,
              chat_template_kwargs: dict[str, Any] | None = None) -> str:
    """The conversation as the chat template renders it, as text (see chat_prompt)."""
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
