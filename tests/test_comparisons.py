"""The engine-against-engine comparison lets two candidates a rounding apart trade the last
place of the top log-probabilities, and nothing else."""

from types import SimpleNamespace

import pytest

from tests.comparisons import assert_same_samples


def _sample(*steps: dict[int, float]):
    return SimpleNamespace(token_ids=[max(step, key=step.get) for step in steps],
                           logprobs=[{token: SimpleNamespace(logprob=value) for token, value in step.items()}
                                     for step in steps])


def test_a_tie_at_the_last_place_may_swap():
    expected = _sample({5: -0.1, 7: -3.0000004}, {2: -0.2, 9: -2.5})
    actual = _sample({5: -0.1000002, 8: -3.0000001}, {2: -0.2000001, 9: -2.5000003})
    assert_same_samples([expected], [actual], atol=1e-3)


@pytest.mark.parametrize("actual, message", [
    (_sample({5: -0.1, 8: -2.0}), "listed by one run only"),  # 8 well above 7: not a tie
    (_sample({5: -0.1, 7: -3.01}), "step 0"),  # a shared entry off by more than atol
    (_sample({6: -0.1, 7: -3.0}), "sample 0"),  # another greedy token
])
def test_anything_else_differs(actual, message):
    with pytest.raises(AssertionError, match=message):
        assert_same_samples([_sample({5: -0.1, 7: -3.0})], [actual], atol=1e-3)
