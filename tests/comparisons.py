"""Comparing two runs of the engine: same greedy tokens, and the same top log-probability
entries within a tolerance."""

from __future__ import annotations


def assert_same_samples(expected, actual, atol: float) -> None:
    """`expected` / `actual`: lists of CompletionOutput requested with logprobs."""
    assert len(expected) == len(actual)
    for index, (a, b) in enumerate(zip(expected, actual)):
        assert a.token_ids == b.token_ids, f"sample {index}"
        assert len(a.logprobs) == len(b.logprobs) == len(a.token_ids), f"sample {index}"
        for step, (top_a, top_b) in enumerate(zip(a.logprobs, b.logprobs)):
            assert top_a.keys() == top_b.keys(), f"sample {index} step {step}"
            for token in top_a:
                assert abs(top_a[token].logprob - top_b[token].logprob) < atol, f"sample {index} step {step}"
