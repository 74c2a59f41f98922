"""Comparing two runs of the engine: same greedy tokens, and the same top log-probability
entries within a tolerance."""

from __future__ import annotations


def assert_same_samples(expected, actual, atol: float) -> None:
    """`expected` / `actual`: lists of CompletionOutput requested with logprobs. The two
    runs' top entries at a step may differ only by a tie at their last place: a token one
    run lists and the other does not must be within `atol` of the lowest entry the other
    lists (two candidates a rounding apart trade that place, as vLLM's checks allow)."""
    assert len(expected) == len(actual)
    for index, (a, b) in enumerate(zip(expected, actual)):
        assert a.token_ids == b.token_ids, f"sample {index}"
        assert len(a.logprobs) == len(b.logprobs) == len(a.token_ids), f"sample {index}"
        for step, (top_a, top_b) in enumerate(zip(a.logprobs, b.logprobs)):
            where = f"sample {index} step {step}"
            for token in top_a.keys() & top_b.keys():
                assert abs(top_a[token].logprob - top_b[token].logprob) < atol, where
            for listed, other in ((top_a, top_b), (top_b, top_a)):
                lowest = min(entry.logprob for entry in other.values())
                for token in listed.keys() - other.keys():
                    assert listed[token].logprob < lowest + atol, (
                        f"{where}: token {token} ({listed[token].logprob:.6f}) is listed by one run only, "
                        f"above the other's lowest entry ({lowest:.6f})")
