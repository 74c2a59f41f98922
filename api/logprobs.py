"""OpenAI's completions logprobs shape from the engine's per-token {token_id: Logprob}
dicts: for generated tokens, and for an echoed prompt's (vLLM's prompt_logprobs)."""

from __future__ import annotations

import functools

from api.protocol import CompletionLogprobs, PromptLogprob

# vLLM's floor for a logprob in a response: JSON has no -Infinity (a token whose
# probability underflowed float32 would otherwise fail the whole response).
MIN_LOGPROB = -9999.0


def openai_logprobs(token_ids, entries, num_top: int, text_offset: int = 0,
                    as_token_ids: bool = False) -> CompletionLogprobs:
    """Each token's string and logprob, the top `num_top` with the token itself always
    among them (as OpenAI and vLLM answer: up to num_top + 1 entries, one for
    logprobs=0), and text offsets from `text_offset`. as_token_ids (vLLM's
    return_tokens_as_token_ids): tokens and top keys read "token_id:<id>", for tokens
    whose text is not theirs alone (part of a character, or a model without a tokenizer)."""
    out = CompletionLogprobs()
    for token_id, entry in zip(token_ids, entries):
        sampled = entry[token_id]
        name = functools.partial(token_name, entry, as_token_ids=as_token_ids)
        ranked = ranked_token_ids(entry)
        out.tokens.append(name(token_id))
        out.token_logprobs.append(floored_logprob(sampled.logprob))
        top = {name(tid): floored_logprob(entry[tid].logprob) for tid in ranked[:num_top]}
        top.setdefault(name(token_id), floored_logprob(sampled.logprob))
        out.top_logprobs.append(top)
        out.text_offset.append(text_offset)
        text_offset += len(sampled.decoded_token or "")
    return out


def decoded_length(token_ids, entries) -> int:
    """Characters the tokens' texts take: where the next token's text_offset starts."""
    return sum(len(entry[token_id].decoded_token or "") for token_id, entry in zip(token_ids, entries))


def ranked_token_ids(entry) -> list[int]:
    """An entry's ranked token ids, most likely first (the sampled token, when it is not
    among the top ones the engine computed, has no rank)."""
    return sorted((tid for tid, lp in entry.items() if lp.rank is not None), key=lambda tid: entry[tid].rank)


def floored_logprob(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)


def token_name(entry, token_id: int, *, as_token_ids: bool) -> str:
    return f"token_id:{token_id}" if as_token_ids else entry[token_id].decoded_token or ""


def echoed_prompt_logprobs(token_ids: list[int], entries, num_top: int, tokenizer, echo: str,
                           as_token_ids: bool = False) -> CompletionLogprobs:
    """An echoed prompt's tokens: the first has none (nothing precedes it; its string from
    `tokenizer`, "" without one), then each with its own and the top ones. Offsets index
    `echo`, the text echoed: where the tokens' strings run longer than it (a text prompt's
    BOS, which its text never had), the surplus takes no room at its start, so the offsets
    stay within the echo and never go back at the generated tokens that follow it."""
    first = tokenizer.decode(token_ids[:1]) if tokenizer is not None else ""
    name = f"token_id:{token_ids[0]}" if as_token_ids else first
    head = CompletionLogprobs(tokens=[name], token_logprobs=[None], top_logprobs=[None], text_offset=[0])
    out = joined(head, openai_logprobs(token_ids[1:], entries[1:], num_top, len(first), as_token_ids))
    extra = len(first) + decoded_length(token_ids[1:], entries[1:]) - len(echo)
    if extra > 0:
        out.text_offset = [max(0, offset - extra) for offset in out.text_offset]
    return out


def vllm_prompt_logprobs(token_ids: list[int], entries, num_top: int) -> list[dict[int, PromptLogprob] | None]:
    """vLLM's prompt_logprobs field: None for the first token, then each token's own entry
    and those ranked within num_top (the engine may have computed more, for echo)."""
    out: list[dict[int, PromptLogprob] | None] = [None]
    for token_id, entry in zip(token_ids[1:], entries[1:]):
        out.append({tid: PromptLogprob(logprob=floored_logprob(lp.logprob), rank=lp.rank, decoded_token=lp.decoded_token)
                    for tid, lp in entry.items() if tid == token_id or (lp.rank or 0) <= num_top})
    return out


def joined(first: CompletionLogprobs, second: CompletionLogprobs) -> CompletionLogprobs:
    return CompletionLogprobs(tokens=first.tokens + second.tokens,
                              token_logprobs=first.token_logprobs + second.token_logprobs,
                              top_logprobs=first.top_logprobs + second.top_logprobs,
                              text_offset=first.text_offset + second.text_offset)
