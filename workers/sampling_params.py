"""Per-request sampling settings, as vLLM users know them. Validated on construction,
so a bad value is a ValueError on the driver, never an error inside a shard."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: all tokens
    min_p: float = 0.0  # drop tokens below min_p x the top token's probability (0: off)
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # top-k log-probabilities per generated token
    prompt_logprobs: int | None = None  # top-k log-probabilities per prompt token (token-id prompts)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # {token id: bias}, added to the logits before anything else (OpenAI's field; greedy too)
    logit_bias: dict[int, float] | None = None
    truncate_prompt_tokens: int | None = None  # keep the prompt's last k tokens (-1: max_model_len)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids or ()))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        if self.logit_bias is not None:
            object.__setattr__(self, "logit_bias", _logit_bias(self.logit_bias) or None)
        self._validate()

    def _validate(self) -> None:
        checks = [
            (self.n >= 1, f"n must be >= 1, got {self.n}"),
            (math.isfinite(self.temperature) and self.temperature >= 0.0,
             f"temperature must be a finite number >= 0, got {self.temperature}"),
            (0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"top_k must be -1 (disabled) or >= 1, got {self.top_k}"),
            (0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.truncate_prompt_tokens is None or self.truncate_prompt_tokens == -1
             or self.truncate_prompt_tokens >= 1,
             f"truncate_prompt_tokens must be -1 (max_model_len) or >= 1, got {self.truncate_prompt_tokens}"),
            (self.max_tokens is None or self.max_tokens >= 1,
             f"max_tokens must be >= 1, got {self.max_tokens}"),
            (self.min_tokens >= 0, f"min_tokens must be >= 0, got {self.min_tokens}"),
            (self.max_tokens is None or self.min_tokens <= self.max_tokens,
             f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})"),
            (self.logprobs is None or 0 <= self.logprobs <= 20,
             f"logprobs must be between 0 and 20, got {self.logprobs}"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
             f"prompt_logprobs must be between 0 and 20, got {self.prompt_logprobs}"),
            (-2.0 <= self.presence_penalty <= 2.0,
             f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2.0 <= self.frequency_penalty <= 2.0,
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0.0,
             f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}"),
            # A torch generator takes 64-bit seeds (as vLLM's protocol bounds it); a larger
            # one failed on the leader shard after the request was sent, which hung it.
            (self.seed is None or -(1 << 63) <= self.seed < (1 << 63),
             f"seed must be a 64-bit integer in [-2**63, 2**63 - 1], got {self.seed}"),
            (all(isinstance(s, str) and s for s in self.stop),
             "stop must be a non-empty string or a list of non-empty strings"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def for_sample(self, index: int) -> "SamplingParams":
        """The params of sample `index` of n: one sample, and a distinct seed per sample
        (seed + index) so n seeded samples differ yet each is reproducible."""
        # seed + index, wrapped into the 64-bit range a seed must stay in.
        seed = None if self.seed is None else (self.seed + index + (1 << 63)) % (1 << 64) - (1 << 63)
        return dataclasses.replace(self, n=1, seed=seed)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    def check_vocab(self, vocab_size: int) -> None:
        """ValueError if a token id this request names is outside the model's vocabulary."""
        outside = sorted(t for t in (self.logit_bias or {}) if t >= vocab_size)
        if outside:
            raise ValueError(f"logit_bias names token ids outside the vocabulary [0, {vocab_size}): {outside[:5]}")

    @property
    def has_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )


def _logit_bias(bias) -> dict[int, float]:
    """{token id: bias} with int ids >= 0 and finite biases in [-100, 100], as OpenAI takes
    them (its JSON keys are strings of ids); ValueError naming the bad entry otherwise."""
    if not isinstance(bias, dict):
        raise ValueError(f"logit_bias must be a mapping of token ids to biases, got {type(bias).__name__}")
    checked = {}
    for key, value in bias.items():
        try:
            token_id = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"logit_bias keys must be token ids, got {key!r}") from None
        if token_id < 0 or isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not -100.0 <= value <= 100.0:
            raise ValueError(f"logit_bias must map token ids >= 0 to biases in [-100, 100], got {key!r}: {value!r}")
        checked[token_id] = float(value)
    return checked
