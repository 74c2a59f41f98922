"""OpenAI's completions logprobs shape from the engine's per-token {token_id: Logprob}
dicts: for generated tokens, and for an echoed prompt's (vLLM's prompt_logprobs)."""

from __future__ import annotations

from api.protocol import CompletionLogprobs


def openai_logprobs(token_ids, entries, num_top: int, text_offset: int = 0) -> CompletionLogprobs:
    """Each token's string and logprob, the top `num_top` with the token itself always
    among them (as OpenAI and vLLM answer: up to num_top + 1 entries, one for
    logprobs=0), and text offsets from `text_offset`."""
    out = CompletionLogprobs()
    for token_id, entry in zip(token_ids, entries):
        sampled = entry[token_id]
        ranked = sorted((lp for lp in entry.values() if lp.rank is not None), key=lambda lp: lp.rank)
        out.tokens.append(sampled.decoded_token or "")
        out.token_logprobs.append(sampled.logprob)
        top = {lp.decoded_token or "": lp.logprob for lp in ranked[:num_top]}
        top.setdefault(sampled.decoded_token or "", sampled.logprob)
        out.top_logprobs.append(top)
        out.text_offset.append(text_offset)
        text_offset += len(sampled.decoded_token or "")
    return out


def echoed_prompt_logprobs(token_ids: list[int], entries, num_top: int, tokenizer) -> CompletionLogprobs:
    """An echoed prompt's tokens: the first has none (nothing precedes it; its string from
    `tokenizer`, "" without one), then each with its own and the top ones."""
    first = tokenizer.decode(token_ids[:1]) if tokenizer is not None else ""
    head = CompletionLogprobs(tokens=[first], token_logprobs=[None], top_logprobs=[None], text_offset=[0])
    return joined(head, openai_logprobs(token_ids[1:], entries[1:], num_top, len(first)))


def joined(first: CompletionLogprobs, second: CompletionLogprobs) -> CompletionLogprobs:
    return CompletionLogprobs(tokens=first.tokens + second.tokens,
                              token_logprobs=first.token_logprobs + second.token_logprobs,
                              top_logprobs=first.top_logprobs + second.top_logprobs,
                              text_offset=first.text_offset + second.text_offset)
