"""Parsing and validation of prompts — text, token ids or prompt embeddings — into what
the engine takes. Every problem is a ValueError that says what was expected, raised
before anything reaches a shard. Runs on the driver or a Serve replica."""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from workers.messages import PromptEmbedsRef

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# A prompt's embeddings are cast and made contiguous on few of torch's CPU threads: one per
# ELEMENTS_PER_THREAD values, one per THREADS_PER_CHECK_THREAD of torch's, at most
# CHECK_THREADS. Waking all of a many-vCPU host's idle threads costs far more than the op,
# and on a machine of few vCPUs, busy serving, even waking one more does. Cast and check (by aminmax then) of
# a (128, 4096) float32 tensor (`scripts/bench_embeds_codec.py --threads`, BENCHMARKS.md),
# hot / after a 20 ms pause as between requests: on a 64-vCPU GPU host, 0.06 / 10.7 ms with
# torch's default 64 threads, 0.07 / 0.57 ms with 8 and 0.23 / 0.73 ms with 1 (and the
# object-store put after it ran 1.1 ms with 64 against 0.4 with 8); on a 2-vCPU machine,
# 0.11-0.19 / 7.7 ms with 2 threads and 0.29 / 0.5 ms with 1.
ELEMENTS_PER_THREAD = 64 << 10
THREADS_PER_CHECK_THREAD = 8
CHECK_THREADS = 8


@dataclass(frozen=True)
class EnginePrompt:
    """One validated prompt: token ids, or embeddings, or (a chat with prompt_embeds
    parts, or vLLM's prompt_is_token_ids offline) token ids at every position with
    embeddings rows for the positions of `embeds_spans`, where the ids are placeholders."""

    prompt: str | None  # the text, when the prompt was text
    prompt_token_ids: tuple[int, ...] | None
    # (seq_len, hidden), bfloat16 viewed as uint16; or, once put into the object store
    # (the server puts a prompt's embeddings once, for all its samples), the reference.
    prompt_embeds: np.ndarray | PromptEmbedsRef | None
    embeds_dtype: str | None = None
    # vLLM's cache_salt: the prompt's prefix-cache keys are salted with it, so it shares
    # cached K/V only with prompts of the same salt (one per tenant, say).
    cache_salt: str | None = None
    embeds_spans: tuple[tuple[int, int], ...] | None = None  # [start, end) the rows fill, in order

    @property
    def num_tokens(self) -> int:
        if self.prompt_token_ids is not None:
            return len(self.prompt_token_ids)
        return self.prompt_embeds.shape[0]


def validate_prompt_embeds(tensor, hidden_size: int, dtype: torch.dtype) -> torch.Tensor:
    """A (seq_len, hidden_size) dense floating tensor of finite values, cast to `dtype`.

    A leading batch dimension of 1 is squeezed. Anything else is a ValueError."""
    tensor = check_embeds_form(tensor, hidden_size)
    with at_most_torch_threads(check_threads(tensor.numel())):
        tensor = tensor.detach().to("cpu", dtype).resolve_neg().contiguous()  # a lazy negation made real
    if not all_finite(tensor):
        raise ValueError(f"prompt_embeds contains NaN or Inf (after casting to {dtype})")
    return tensor


# A floating dtype's values read as integers of its width: each NaN or Inf, and only those,
# has every exponent bit set. Read as signed integers the positive ones are the largest
# patterns, from the first value below; read as unsigned, the negative ones are, from the
# second. So two integer max reductions find them, which numpy runs on one thread without
# holding the GIL. For a (256, 4096) bfloat16 prompt on the H200 host, out of the caches as a
# new request's rows are: 0.25 ms, against 0.44 ms for aminmax over its values on one of
# torch's threads (0.22 on two). In cache, on the 2-core machine: 0.05 against 0.08 ms
# (BENCHMARKS.md, session 29; bench_embeds_codec.py --parts).
_NON_FINITE_FROM = {
    torch.bfloat16: (torch.int16, np.uint16, 0x7F80, 0xFF80),
    torch.float16: (torch.int16, np.uint16, 0x7C00, 0xFC00),
    torch.float32: (torch.int32, np.uint32, 0x7F800000, 0xFF800000),
    torch.float64: (torch.int64, np.uint64, 0x7FF0000000000000, 0xFFF0000000000000),
}


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether a non-empty floating CPU tensor holds no NaN and no Inf (by its bits, above)."""
    signed, unsigned, positive_from, negative_from = _NON_FINITE_FROM[tensor.dtype]
    bits = tensor.view(signed).numpy()
    return int(bits.max()) < positive_from and int(bits.view(unsigned).max()) < negative_from


def check_embeds_form(tensor, hidden_size: int) -> torch.Tensor:
    """validate_prompt_embeds' checks that read no values: a dense floating tensor of shape
    (seq_len >= 1, hidden_size), a leading batch dimension of 1 squeezed."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"prompt_embeds must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.layout != torch.strided or tensor.is_quantized or tensor.is_nested:
        raise ValueError(f"prompt_embeds must be a dense tensor, got layout {tensor.layout}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"prompt_embeds must have a floating dtype (float16, bfloat16, float32, float64), "
            f"got {tensor.dtype}"
        )
    if tensor.dim() == 3 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.dim() != 2 or tensor.shape[1] != hidden_size:
        raise ValueError(
            f"prompt_embeds: expected shape (seq_len, {hidden_size}), got {tuple(tensor.shape)}"
        )
    if tensor.shape[0] == 0:
        raise ValueError("prompt_embeds must have at least one row, got shape "
                         f"{tuple(tensor.shape)}")
    return tensor


def check_threads(numel: int) -> int:
    """How many of torch's CPU threads an op over `numel` embeddings values gets (above)."""
    return max(1, min(CHECK_THREADS, torch.get_num_threads() // THREADS_PER_CHECK_THREAD, numel // ELEMENTS_PER_THREAD))


def concat_rows(pieces: list[torch.Tensor]) -> torch.Tensor:
    """Rows of several (n, hidden) pieces as one contiguous tensor, on as few of torch's
    threads as their check would use (a cat on all of a many-vCPU host's costs
    milliseconds); one piece as it is, when contiguous."""
    if len(pieces) == 1:
        return pieces[0].contiguous()
    with at_most_torch_threads(check_threads(sum(piece.numel() for piece in pieces))):
        return torch.cat(pieces)


@contextlib.contextmanager
def at_most_torch_threads(limit: int):
    """Inside the block, the calling thread's torch ops use at most `limit` CPU threads;
    after it, as many as before. Under OpenMP the count is each OS thread's own, so threads
    already running torch keep theirs; one that first asks while the block runs starts
    with `limit`. A Ray worker's count (1 unless the task has CPUs) is left as it is."""
    before = torch.get_num_threads()
    if before <= limit:
        yield
        return
    torch.set_num_threads(limit)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def embeds_prompt(tensor: torch.Tensor, hidden_size: int, dtype: torch.dtype) -> EnginePrompt:
    """The prompt of a tensor that validate_prompt_embeds returned (the server's payload
    decoder runs it), without reading its values a second time. Only what costs nothing is
    checked again: a tensor that skipped validation is a ValueError, not a bad request."""
    if (not isinstance(tensor, torch.Tensor) or tensor.dim() != 2 or tensor.shape[0] == 0
            or tensor.shape[1] != hidden_size or tensor.dtype != dtype or tensor.device.type != "cpu"
            or not tensor.is_contiguous()):
        raise ValueError(f"embeds_prompt takes a validated (seq_len, {hidden_size}) {dtype} CPU tensor "
                         "(see validate_prompt_embeds)")
    array, dtype_name = to_object_store_array(tensor)
    return EnginePrompt(None, None, array, dtype_name)


def mixed_prompt(token_ids: tuple[int, ...], rows: torch.Tensor, embeds_spans: tuple[tuple[int, int], ...],
                 hidden_size: int, dtype: torch.dtype) -> EnginePrompt:
    """A prompt of token ids whose `embeds_spans` positions take `rows` (validated, as
    embeds_prompt takes them) instead, in order; ValueError if they do not fit."""
    previous_end = 0
    for start, end in embeds_spans:
        if not previous_end <= start < end <= len(token_ids):
            raise ValueError(f"embeds_spans must be ordered, disjoint, non-empty spans within the prompt's "
                             f"{len(token_ids)} positions; got {embeds_spans}")
        previous_end = end
    num_rows = sum(end - start for start, end in embeds_spans)
    if rows.shape[0] != num_rows:
        raise ValueError(f"the prompt's embeddings have {rows.shape[0]} rows for {num_rows} positions")
    return dataclasses.replace(embeds_prompt(rows, hidden_size, dtype), prompt_token_ids=tuple(token_ids),
                               embeds_spans=tuple(embeds_spans))


def to_object_store_array(tensor: torch.Tensor) -> tuple[np.ndarray, str]:
    """numpy for the object store (zero-copy on a node, unlike pickled tensors);
    bfloat16, which numpy lacks, travels viewed as uint16 with its name beside it."""
    dtype_name = str(tensor.dtype).removeprefix("torch.")
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.uint16).numpy(), dtype_name
    return tensor.numpy(), dtype_name


def parse_prompt(
    prompt,
    *,
    tokenizer,
    vocab_size: int,
    hidden_size: int,
    dtype: torch.dtype,
    enable_prompt_embeds: bool,
) -> EnginePrompt:
    """str | {"prompt": str} | {"prompt_token_ids": [...]} | {"prompt_embeds": tensor}, or,
    as vLLM's, {"prompt_token_ids": [...], "prompt_embeds": tensor, "prompt_is_token_ids":
    [bool, ...]}, all of one length, the embeddings' rows taken where the mask is False; a
    dict may also carry "cache_salt" (a non-empty string, as vLLM's)."""
    if isinstance(prompt, str):
        prompt = {"prompt": prompt}
    if not isinstance(prompt, dict):
        raise ValueError(
            "a prompt must be a string or a dict with one of 'prompt', 'prompt_token_ids', "
            f"'prompt_embeds'; got {type(prompt).__name__}"
        )
    salt = validate_cache_salt(prompt.get("cache_salt"))
    if prompt.get("prompt_is_token_ids") is not None:
        if not enable_prompt_embeds:
            raise ValueError("prompt_embeds given but prompt embeddings are disabled; pass enable_prompt_embeds=True")
        parsed = _mixed_prompt(prompt, vocab_size, hidden_size, dtype)
        return parsed if salt is None else dataclasses.replace(parsed, cache_salt=salt)
    keys = [k for k in ("prompt", "prompt_token_ids", "prompt_embeds") if prompt.get(k) is not None]
    if len(keys) != 1:
        raise ValueError(
            "a prompt dict needs exactly one of 'prompt', 'prompt_token_ids', 'prompt_embeds'; "
            f"got {sorted(prompt)}"
        )
    if keys[0] == "prompt_embeds":
        if not enable_prompt_embeds:
            raise ValueError(
                "prompt_embeds given but prompt embeddings are disabled; "
                "pass enable_prompt_embeds=True"
            )
        parsed = embeds_prompt(validate_prompt_embeds(prompt["prompt_embeds"], hidden_size, dtype),
                               hidden_size, dtype)
    elif keys[0] == "prompt":
        parsed = EnginePrompt(prompt["prompt"], _tokenize(prompt["prompt"], tokenizer), None)
    else:
        parsed = EnginePrompt(None, validate_token_ids(prompt["prompt_token_ids"], vocab_size), None)
    return parsed if salt is None else dataclasses.replace(parsed, cache_salt=salt)


def _mixed_prompt(prompt: dict, vocab_size: int, hidden_size: int, dtype: torch.dtype) -> EnginePrompt:
    """vLLM's mixed prompt: token ids, full-length embeddings and prompt_is_token_ids."""
    if prompt.get("prompt_token_ids") is None or prompt.get("prompt_embeds") is None:
        raise ValueError("prompt_is_token_ids needs both prompt_token_ids and prompt_embeds, of its length")
    token_ids = validate_token_ids(prompt["prompt_token_ids"], vocab_size)
    embeds = check_embeds_form(prompt["prompt_embeds"], hidden_size)
    is_token = prompt["prompt_is_token_ids"]
    if isinstance(is_token, torch.Tensor):
        is_token = is_token.tolist()
    if not isinstance(is_token, (list, tuple)) or not all(isinstance(flag, bool) for flag in is_token):
        raise ValueError("prompt_is_token_ids must be a list of booleans, one per position")
    if not len(token_ids) == embeds.shape[0] == len(is_token):
        raise ValueError(f"prompt_token_ids ({len(token_ids)}), prompt_embeds ({embeds.shape[0]} rows) and "
                         f"prompt_is_token_ids ({len(is_token)}) must have the same length")
    spans, start = [], None
    for position, flag in enumerate([*is_token, True]):
        if not flag and start is None:
            start = position
        elif flag and start is not None:
            spans.append((start, position))
            start = None
    if not spans:  # every position a token id
        return EnginePrompt(None, token_ids, None)
    # Only the rows the prompt takes are read: those at token ids' positions are not its input.
    rows = validate_prompt_embeds(concat_rows([embeds[a:b] for a, b in spans]), hidden_size, dtype)
    return mixed_prompt(token_ids, rows, tuple(spans), hidden_size, dtype)


def validate_cache_salt(salt) -> str | None:
    """None, or a non-empty string (vLLM's rule for cache_salt)."""
    if salt is not None and (not isinstance(salt, str) or not salt):
        raise ValueError("cache_salt must be a non-empty string if provided")
    return salt


def parse_engine_prompt(prompt, config, tokenizer) -> EnginePrompt:
    """parse_prompt with the facts and settings of an engine's EngineConfig."""
    return parse_prompt(
        prompt,
        tokenizer=tokenizer,
        vocab_size=config.model_config.vocab_size,
        hidden_size=config.model_config.hidden_size,
        dtype=config.torch_dtype,
        enable_prompt_embeds=config.enable_prompt_embeds,
    )


def _tokenize(text, tokenizer) -> tuple[int, ...]:
    if not isinstance(text, str):
        raise ValueError(f"'prompt' must be a string, got {type(text).__name__}")
    if tokenizer is None:
        raise ValueError(
            "this model has no tokenizer, so text prompts cannot be used; send token ids "
            "(prompt_token_ids offline, a list of ids as the prompt over HTTP) or prompt_embeds"
        )
    ids = tuple(tokenizer.encode(text))
    if not ids:
        raise ValueError("the prompt is empty: it tokenizes to no tokens")
    return ids


def validate_token_ids(token_ids, vocab_size: int) -> tuple[int, ...]:
    if isinstance(token_ids, torch.Tensor):
        token_ids = token_ids.tolist()
    if not isinstance(token_ids, (list, tuple)) or not token_ids:
        raise ValueError("prompt_token_ids must be a non-empty list of integers")
    for token in token_ids:
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size:
            raise ValueError(
                f"prompt_token_ids must be integers in [0, {vocab_size}); got {token!r}"
            )
    return tuple(token_ids)


def truncation_length(truncate_prompt_tokens: int | None, max_model_len: int) -> int | None:
    """vLLM's truncate_prompt_tokens: None (keep the whole prompt), -1 (its last
    max_model_len tokens) or k in [1, max_model_len]; ValueError past max_model_len."""
    if truncate_prompt_tokens is None:
        return None
    if truncate_prompt_tokens == -1:
        return max_model_len
    if truncate_prompt_tokens > max_model_len:
        raise ValueError(f"truncate_prompt_tokens ({truncate_prompt_tokens}) is greater than "
                         f"max_model_len ({max_model_len})")
    return truncate_prompt_tokens


def truncate_prompt(prompt: EnginePrompt, num_tokens: int | None) -> EnginePrompt:
    """The last `num_tokens` tokens, or embedding rows, of a prompt (left truncation, as
    vLLM does); None, or a prompt no longer than that, as it is. A truncated text prompt
    loses its text, so echo shows what the engine saw. Embeddings are truncated before
    they are put into the object store."""
    if num_tokens is None or prompt.num_tokens <= num_tokens:
        return prompt
    if prompt.embeds_spans is not None:
        raise ValueError("truncate_prompt_tokens cannot cut a prompt that mixes token ids and embeddings")
    if prompt.prompt_embeds is not None:
        if not isinstance(prompt.prompt_embeds, np.ndarray):
            raise ValueError("truncate a prompt's embeddings before they are put into the object store")
        return dataclasses.replace(prompt, prompt_embeds=prompt.prompt_embeds[-num_tokens:])
    return dataclasses.replace(prompt, prompt=None, prompt_token_ids=prompt.prompt_token_ids[-num_tokens:])


def check_prompt_logprobs(prompt: EnginePrompt, params) -> None:
    """ValueError for prompt_logprobs of a prompt with embeddings: they have no tokens to score."""
    if params.prompt_logprobs is not None and prompt.prompt_embeds is not None:
        raise ValueError("prompt_logprobs needs a prompt of text or token ids; "
                         "an embeddings prompt has no tokens to score")


def check_length(num_prompt_tokens: int, max_tokens: int | None, max_model_len: int) -> int:
    """The max_tokens to use: as asked, or what fits when None. ValueError if too long."""
    if num_prompt_tokens >= max_model_len:
        raise ValueError(
            f"the prompt has {num_prompt_tokens} tokens, but max_model_len is {max_model_len}: "
            "no room to generate"
        )
    if max_tokens is None:
        return max_model_len - num_prompt_tokens
    if num_prompt_tokens + max_tokens > max_model_len:
        raise ValueError(
            f"this model's maximum context length is {max_model_len} tokens; the prompt has "
            f"{num_prompt_tokens} and max_tokens asks for {max_tokens} more"
        )
    return max_tokens
