"""IncrementalDetokenizer on the built-in model's byte-level BPE tokenizer: streamed pieces
against a full decode, multi-byte characters, stop strings, stop tokens, O(1) windows."""

from __future__ import annotations

import random

import pytest

from cluster.default_model import default_model_path
from cluster import detokenizer
from cluster.detokenizer import IncrementalDetokenizer
from cluster.outputs import CompletionTracker
from cluster.tokenizer import load_tokenizer
from workers.messages import RequestDelta
from workers.sampling_params import SamplingParams

HEAD = "Café au lait 😀 naïve 日本語 — the"
TEXT = HEAD + " weather is fine. The cat sat on the mat."
EOT = 4


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        cache = tmp_path_factory.getbasetemp() / "shardserve-cache"  # shared with other modules
        patch.setenv("SHARDSERVE_CACHE_DIR", str(cache))
        return load_tokenizer(default_model_path())


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def _stream(detok, ids, chunk_sizes=None, finish_reason="length", stop_reason=None):
    """Feeds ids in chunks (one token each by default); returns the pieces."""
    chunk_sizes = chunk_sizes or [1] * len(ids)
    pieces, start = [], 0
    for size in chunk_sizes:
        chunk, start = ids[start:start + size], start + size
        is_last = start >= len(ids)
        pieces.append(detok.update(chunk, finish_reason if is_last else None,
                                   stop_reason if is_last else None))
        if is_last or detok.is_finished:
            break
    return pieces


def _expected_stop(text: str, stops, include: bool) -> tuple[str, str | None]:
    """Reference: the stop string that completes first in `text`, and the truncated text."""
    found = [(text.find(s) + len(s), text.find(s), s) for s in stops if s in text]
    if not found:
        return text, None
    end, start, stop = min(found)
    return text[: end if include else start], stop


def test_pieces_of_valid_text_never_split_a_character(tokenizer):
    ids = _encode(tokenizer, TEXT)
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("Hello"), SamplingParams())
    pieces = _stream(detok, ids)
    assert "".join(pieces) == detok.text == TEXT
    assert not any("\ufffd" in piece for piece in pieces)
    assert pieces.count("") >= 3  # the emoji and CJK characters span several tokens
    assert detok.token_ids == ids


def test_random_token_streams_match_a_full_decode(tokenizer):
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 40))]
        prompt = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(0, 8))] or None
        skip = rng.random() < 0.7
        detok = IncrementalDetokenizer(tokenizer, prompt, SamplingParams(skip_special_tokens=skip))
        chunks = [rng.randrange(1, 5) for _ in ids]
        pieces = _stream(detok, ids, chunks)
        assert "".join(pieces) == detok.text == tokenizer.decode(ids, skip_special_tokens=skip)


def test_incomplete_character_is_held_then_flushed_at_finish(tokenizer):
    emoji = _encode(tokenizer, "😀")
    assert len(emoji) == 4  # one token per UTF-8 byte
    detok = IncrementalDetokenizer(tokenizer, None, SamplingParams())
    assert detok.update(_encode(tokenizer, "ok") + emoji[:-1]) == "ok"
    assert detok.update([], "length") == tokenizer.decode(emoji[:-1]) == "\ufffd"
    assert detok.text == "ok\ufffd" and detok.update(emoji[-1:]) == ""


def test_prompt_cut_inside_a_character_does_not_merge_with_the_output(tokenizer):
    emoji = _encode(tokenizer, "😀")
    output = emoji[2:] + _encode(tokenizer, "ok")
    prompt = _encode(tokenizer, "a ") + emoji[:2]
    detok = IncrementalDetokenizer(tokenizer, prompt, SamplingParams())
    assert "".join(_stream(detok, output)) == tokenizer.decode(output) == "\ufffd\ufffdok"


def test_stop_string_in_text_flushed_at_finish_still_truncates(tokenizer):
    space_and_lead_bytes = tokenizer.convert_tokens_to_ids("ĠâĢ")  # " " + 2 of 3 bytes of "—"
    assert tokenizer.decode([space_and_lead_bytes]) == " \ufffd"
    detok = IncrementalDetokenizer(tokenizer, None, SamplingParams(stop=(" ",)))
    assert detok.update(_encode(tokenizer, "ok") + [space_and_lead_bytes]) == "ok"
    assert detok.update([], "length") == "" and detok.stop_matched == " " and detok.text == "ok"


def test_special_tokens_skipped_or_kept(tokenizer):
    ids = [2] + _encode(tokenizer, "user") + [3] + _encode(tokenizer, " hi")
    kept = IncrementalDetokenizer(tokenizer, None, SamplingParams(skip_special_tokens=False))
    assert "".join(_stream(kept, ids)) == "<|start_header_id|>user<|end_header_id|> hi"
    skipped = IncrementalDetokenizer(tokenizer, None, SamplingParams())
    assert "".join(_stream(skipped, ids)) == "user hi"


@pytest.mark.parametrize("stops, include, expected", [
    (("on the",), False, HEAD + " weather is fine. The cat sat "),
    (("dog", "sat", "cat"), False, HEAD + " weather is fine. The "),
    (("eat",), False, HEAD + " w"),  # inside the token " weather"
    (("ther is f",), False, HEAD + " wea"),  # across tokens
    (("naïve 日",), False, "Café au lait 😀 "),  # ends inside a multi-byte token run
    (("weat", "ea"), False, HEAD + " w"),  # first to complete wins
    (("mat.",), True, TEXT),
    (("the m", "he mat"), True, HEAD + " weather is fine. The cat sat on the m"),
])
def test_stop_strings_truncate_where_openai_does(tokenizer, stops, include, expected):
    ids = _encode(tokenizer, TEXT)
    assert _expected_stop(TEXT, stops, include)[0] == expected
    for chunks in (None, [len(ids)], [3] * len(ids)):
        params = SamplingParams(stop=stops, include_stop_str_in_output=include)
        detok = IncrementalDetokenizer(tokenizer, None, params)
        pieces = _stream(detok, ids, chunks, finish_reason=None)
        assert "".join(pieces) == detok.text == expected
        assert detok.stop_matched == _expected_stop(TEXT, stops, include)[1] and detok.is_finished
        completed = tokenizer.decode(detok.token_ids)
        assert detok.stop_matched in completed and detok.stop_matched not in tokenizer.decode(
            detok.token_ids[:-1])  # token_ids end with the token completing the stop


def test_text_that_may_begin_a_stop_is_held_until_disambiguated(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, None, SamplingParams(stop=("the mat",)))
    assert detok.update(_encode(tokenizer, "on the")) == "on "
    assert detok.update(_encode(tokenizer, " ma")) == ""
    assert detok.text == "on "
    assert detok.update(_encode(tokenizer, "p")) == "the map"
    assert detok.update(_encode(tokenizer, " and the mat")) == " and "
    assert detok.stop_matched == "the mat" and detok.update(_encode(tokenizer, " more")) == ""


@pytest.fixture(params=[4096, 8], ids=["default", "tiny-working-string"])
def working_chars(request, monkeypatch):
    """A tiny working string retires returned text on almost every update."""
    monkeypatch.setattr(detokenizer, "_MAX_WORKING_CHARS", request.param)
    return request.param


def test_random_streams_with_stop_strings_match_the_reference(tokenizer, working_chars):
    rng = random.Random(1)
    words = TEXT.split() + ["the", "he", "at", "a", "é"]
    for _ in range(150):
        text = " ".join(rng.choice(words) for _ in range(rng.randrange(3, 15)))
        ids = _encode(tokenizer, text)
        stops = tuple(rng.sample(words, rng.randrange(1, 3)))
        include = rng.random() < 0.5
        expected, stop = _expected_stop(text, stops, include)
        detok = IncrementalDetokenizer(tokenizer, None, SamplingParams(
            stop=stops, include_stop_str_in_output=include))
        pieces = _stream(detok, ids, [rng.randrange(1, 4) for _ in ids])
        assert "".join(pieces) == detok.text == expected, (text, stops, include)
        assert detok.stop_matched == stop


def test_stop_strings_wait_for_min_tokens(tokenizer, working_chars):
    ids = _encode(tokenizer, "at home, at work")
    params = SamplingParams(stop=("at",), min_tokens=2)
    detok = IncrementalDetokenizer(tokenizer, None, params)
    assert "".join(_stream(detok, ids)) == "at home, "
    text = TEXT * 4
    ids = _encode(tokenizer, text)
    for min_tokens in range(len(ids) // 2, len(ids) // 2 + 40, 3):
        if tokenizer.decode(ids[:min_tokens]).endswith("\ufffd"):
            continue
        floor = len(tokenizer.decode(ids[:min_tokens]))
        detok = IncrementalDetokenizer(tokenizer, None, SamplingParams(
            stop=("cat sat", "zzz"), min_tokens=min_tokens, max_tokens=None))
        assert "".join(_stream(detok, ids)) == text[: text.index("cat sat", floor)], min_tokens


def test_stop_token_is_kept_in_ids_but_not_in_text(tokenizer):
    ids = _encode(tokenizer, "hello world") + [EOT]
    detok = IncrementalDetokenizer(tokenizer, None, SamplingParams(skip_special_tokens=False))
    assert "".join(_stream(detok, ids, [len(ids)], "stop", EOT)) == "hello world"
    assert detok.token_ids == ids

    words = _encode(tokenizer, "one two three")  # a normal token as a stop_token_id
    params = SamplingParams(stop_token_ids=(words[-1],))
    detok = IncrementalDetokenizer(tokenizer, None, params)
    assert "".join(_stream(detok, words, None, "stop", words[-1])) == tokenizer.decode(words[:-1])
    included = IncrementalDetokenizer(tokenizer, None, SamplingParams(
        stop_token_ids=(words[-1],), include_stop_str_in_output=True))
    assert "".join(_stream(included, words, None, "stop", words[-1])) == "one two three"


def test_stop_reason_must_be_the_last_new_token(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, None, SamplingParams())
    with pytest.raises(ValueError, match="stop_reason"):
        detok.update(_encode(tokenizer, "hi there"), "stop", EOT)


def test_work_per_token_stays_constant(tokenizer):
    """The decoded window stays a few tokens long, however long the output grows."""
    lengths = []
    decode = tokenizer.decode

    class Spy:
        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def decode(self, ids, **kwargs):
            lengths.append(len(ids))
            return decode(ids, **kwargs)

    ids = _encode(tokenizer, TEXT * 15) + [2, 3] * 20 + _encode(tokenizer, TEXT * 15)
    detok = IncrementalDetokenizer(Spy(), list(range(10, 30)), SamplingParams(stop=("zebra",)))
    assert "".join(_stream(detok, ids)) == TEXT * 30  # skipped special tokens in the middle
    assert len(ids) > 1000 and max(lengths) <= 8


@pytest.mark.parametrize("include", [False, True])
def test_stop_straddling_retired_text(tokenizer, include, working_chars):
    """Returned text leaves the working string; a stop may begin in text already returned."""
    text = TEXT * (80 if working_chars > 8 else 2) + " a zebra crossing ahead"
    ids = _encode(tokenizer, text)
    params = SamplingParams(stop=("zebra cross", "zzz"), include_stop_str_in_output=include)
    detok = IncrementalDetokenizer(tokenizer, None, params)
    pieces = _stream(detok, ids, finish_reason=None)
    expected = text[: text.index("zebra cross") + (len("zebra cross") if include else 0)]
    assert "".join(pieces) == detok.text == expected and detok.stop_matched == "zebra cross"



@pytest.mark.parametrize("stop_reason, stop_token_ids, expected", [
    (EOT, (), None),  # the model's eos: the engine names it (its text is left out); vLLM answers None
    (EOT, (EOT,), EOT),  # the eos asked for as a stop token: its id
    (9, (9,), 9),  # one of the request's stop_token_ids
])
def test_stop_reason_is_what_the_request_asked_to_stop_on(tokenizer, stop_reason, stop_token_ids, expected):
    params = SamplingParams(max_tokens=8, stop_token_ids=stop_token_ids)
    tracker = CompletionTracker(0, tokenizer, (5, 6), params)
    tracker.apply(RequestDelta("r", (7, stop_reason), None, finish_reason="stop", stop_reason=stop_reason))
    output = tracker.output()
    assert (output.finish_reason, output.stop_reason) == ("stop", expected)
    assert output.token_ids == [7, stop_reason]
