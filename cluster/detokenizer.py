"""Incremental detokenization of one sample's output tokens, with stop strings, for
streaming: text once returned is never retracted. Runs on the driver (or the Serve replica)."""

from __future__ import annotations

from workers.sampling_params import SamplingParams

# Prompt tokens decoded ahead of the output, as vLLM does, so the first output token gets
# the leading space / merge it would get in context.
_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"
# Returned text beyond this many chars moves out of the working string, so appending to it
# stays O(1) however long the output grows.
_MAX_WORKING_CHARS = 4096


class IncrementalDetokenizer:
    """Turns a sample's token ids into text as they arrive, O(1) work per token.

    Like vLLM, it decodes a short window `ids[prefix_offset:]` and keeps what follows the
    decode of `ids[prefix_offset:read_offset]`, so a byte-level BPE token that ends inside a
    multi-byte UTF-8 character is held back until the character is complete.

    Stop strings: `update` returns only text that is final. Text that might begin a stop
    string is held back until disambiguated; when one matches, the text ends right before
    it (or right after it, with include_stop_str_in_output), `stop_matched` names it, tokens
    after the one that completed it are dropped, and nothing after it is ever returned.
    Stop strings may only start after the text of the first `min_tokens` tokens.

    The token that ended a request in the engine (eos or one of stop_token_ids, passed as
    `stop_reason`) is kept in `token_ids` but left out of the text, as vLLM does, unless
    include_stop_str_in_output.
    """

    def __init__(self, tokenizer, prompt_token_ids: list[int] | None, params: SamplingParams):
        self.tokenizer = tokenizer
        self.params = params
        self.token_ids: list[int] = []  # output tokens, up to the one completing a stop
        self.stop_matched: str | None = None
        self.is_finished = False
        self._skip_ids = _special_ids(tokenizer) if params.skip_special_tokens else frozenset()
        self._window: list[int] = self._prompt_context(prompt_token_ids)
        self._prefix_offset = 0
        self._read_offset = len(self._window)
        self._retired: list[str] = []  # returned text no stop string can reach any more
        self._decoded = ""  # the rest of the text decoded so far; may run ahead of returned
        self._num_returned = 0  # chars of _decoded returned by update()
        self._stop_floor = 0  # in _decoded, a stop string may only start at or after this
        self._max_stop_len = max(map(len, params.stop), default=0)

    @property
    def text(self) -> str:
        """The output text returned so far (held-back characters excluded)."""
        return "".join(self._retired) + self._decoded[: self._num_returned]

    def update(
        self,
        new_token_ids: list[int],
        finish_reason: str | None = None,
        stop_reason: int | None = None,
    ) -> str:
        """Adds a request's new tokens; returns the text that became final.

        finish_reason: set on the last delta; everything pending is flushed then.
        stop_reason: the token id that ended the request in the engine (eos or a stop
        token id); it must be the last of new_token_ids."""
        if self.is_finished:
            return ""
        num_decoded = len(new_token_ids) - self._num_stop_tokens(new_token_ids, stop_reason)
        for index, token_id in enumerate(new_token_ids):
            self.token_ids.append(token_id)
            if index >= num_decoded:
                continue
            num_chars = len(self._decoded)
            self._decoded += self._decode_next(token_id)
            if len(self.token_ids) <= self.params.min_tokens:
                self._stop_floor = len(self._decoded)
            if self._match_stop(num_chars):
                break
        if finish_reason is not None or stop_reason is not None or self.stop_matched is not None:
            return self._finish()
        return self._take(self._num_final_chars())

    def _num_stop_tokens(self, new_token_ids: list[int], stop_reason: int | None) -> int:
        """1 when the last new token ended the request and stays out of the text."""
        if stop_reason is None:
            return 0
        if not new_token_ids or new_token_ids[-1] != stop_reason:
            raise ValueError(
                f"stop_reason {stop_reason} must be the last of new_token_ids "
                f"{list(new_token_ids)[-3:]}: the engine reports the stop token with its delta"
            )
        return 0 if self.params.include_stop_str_in_output else 1

    def _decode_next(self, token_id: int) -> str:
        """Text the token completes; '' while it ends inside a character."""
        if token_id in self._skip_ids:
            return ""  # keeps skipped specials out of the window, so it stays short
        self._window.append(token_id)
        prefix_text = self._decode(self._window[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._window[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._window)
        return new_text[len(prefix_text) :]

    def _match_stop(self, num_old_chars: int) -> bool:
        """Looks for a stop string ending in the chars added after num_old_chars; on a
        match truncates the text. The stop that completes first wins, as when streaming."""
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for stop in self.params.stop:
            start = self._decoded.find(stop, max(self._stop_floor, num_old_chars - len(stop) + 1))
            if start >= 0 and (best is None or (start + len(stop), start) < best[:2]):
                best = (start + len(stop), start, stop)
        if best is None:
            return False
        end, start, self.stop_matched = best
        self._decoded = self._decoded[: end if self.params.include_stop_str_in_output else start]
        return True

    def _num_final_chars(self) -> int:
        """Chars of _decoded that can be returned: all but a suffix that may begin a stop
        string (only needed when the stop string itself is cut from the output)."""
        if self.params.include_stop_str_in_output or not self.params.stop:
            return len(self._decoded)
        text = self._decoded
        max_held = len(text) - max(self._stop_floor, self._num_returned)
        held = 0
        for stop in self.params.stop:
            for size in range(min(len(stop) - 1, max_held), held, -1):
                if text.endswith(stop[:size]):
                    held = size
                    break
        return len(text) - held

    def _finish(self) -> str:
        """Flushes a trailing incomplete character (as U+FFFD, like a full decode)."""
        if self.stop_matched is None and self._read_offset < len(self._window):
            prefix_text = self._decode(self._window[self._prefix_offset : self._read_offset])
            num_chars = len(self._decoded)
            self._decoded += self._decode(self._window[self._prefix_offset :])[len(prefix_text) :]
            self._read_offset = len(self._window)
            self._match_stop(num_chars)
        self.is_finished = True
        return self._take(len(self._decoded))

    def _take(self, num_chars: int) -> str:
        piece = self._decoded[self._num_returned : num_chars]
        self._num_returned = max(self._num_returned, num_chars)
        if self._num_returned > _MAX_WORKING_CHARS + self._max_stop_len:
            # Keep the chars a stop string ending in later text could start in.
            cut = self._num_returned - self._max_stop_len
            self._retired.append(self._decoded[:cut])
            self._decoded = self._decoded[cut:]
            self._num_returned -= cut
            self._stop_floor = max(0, self._stop_floor - cut)
        return piece

    def _prompt_context(self, prompt_token_ids: list[int] | None) -> list[int]:
        tail = (prompt_token_ids or [])[-_PROMPT_CONTEXT_TOKENS:]
        tail = [token_id for token_id in tail if token_id not in self._skip_ids]
        # A prompt cut inside a character would merge its bytes with the output's.
        return [] if self._decode(tail).endswith(_REPLACEMENT) else tail

    def _decode(self, token_ids: list[int]) -> str:
        # No cleanup: it rewrites " ." as "." and would make window decodes disagree.
        return self.tokenizer.decode(
            token_ids,
            skip_special_tokens=self.params.skip_special_tokens,
            clean_up_tokenization_spaces=False,
        )


def _special_ids(tokenizer) -> frozenset[int]:
    """Every special token id: named ones plus added tokens flagged special (Llama 3's
    header tokens are not among all_special_ids)."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    flagged = {token_id for token_id, token in added.items() if getattr(token, "special", False)}
    return frozenset(tokenizer.all_special_ids) | flagged
