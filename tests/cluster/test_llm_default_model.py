"""The offline LLM on the built-in default model through Ray at tensor_parallel_size 2:
text prompts against Hugging Face, continuous batching, sampling, and bad inputs that
raise ValueError while the LLM keeps working."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from cluster import LLM, SamplingParams
from tests.cluster.local_cluster import wait_until
from tests.cluster.peer_checks import random_ids
from tests.hf_reference import hf_greedy, load_hf_model

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(ray_cluster):
    with LLM(tensor_parallel_size=2, enable_prompt_embeds=True, max_model_len=256,
             kv_cache_memory_bytes=32 << 20) as llm:
        yield llm


@pytest.fixture(scope="module")
def hf_model(llm):
    return load_hf_model(llm.config.model)


def test_text_prompts_match_hf(llm, hf_model):
    tokenizer = llm.get_tokenizer()
    texts = ["The quick brown fox", "Ray places one shard on each GPU, and", "1 2 3"]
    outputs = llm.generate(texts, GREEDY, use_tqdm=False)
    for text, output in zip(texts, outputs):
        ids = tokenizer.encode(text)
        assert output.prompt == text and output.prompt_token_ids == ids
        reference = hf_greedy(hf_model, GREEDY.max_tokens, input_ids=ids)
        assert output.outputs[0].token_ids == reference.token_ids
        assert output.outputs[0].text == tokenizer.decode(reference.token_ids, skip_special_tokens=True)


def test_chat_renders_the_template_and_matches_hf(llm, hf_model):
    tokenizer = llm.get_tokenizer()
    conversations = [[{"role": "user", "content": "What does Ray place on each GPU?"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a GPU."}]]
    outputs = llm.chat(conversations, GREEDY, use_tqdm=False)
    for conversation, output in zip(conversations, outputs):
        ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, return_dict=False)
        assert output.prompt_token_ids == ids
        assert output.outputs[0].token_ids == hf_greedy(hf_model, GREEDY.max_tokens, input_ids=ids).token_ids
    (single,) = llm.chat(conversations[0], GREEDY, use_tqdm=False)  # one conversation, as vLLM takes it
    assert single.outputs[0].token_ids == outputs[0].outputs[0].token_ids
    with pytest.raises(ValueError, match="chat_template_kwargs may not set 'tokenize'"):
        llm.chat(conversations[0], GREEDY, chat_template_kwargs={"tokenize": True})
    # A prompt_embeds part of the model's own embeddings of the question, after a text part.
    question = conversations[0][0]["content"]
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "Q:\n@"}], add_generation_prompt=True,
                                             tokenize=False)
    before, after = (tokenizer.encode(piece, add_special_tokens=False) for piece in rendered.split("@"))
    question_ids = tokenizer.encode(question, add_special_tokens=False)
    text_ids = tokenizer.apply_chat_template([{"role": "user", "content": f"Q:\n{question}"}],
                                             add_generation_prompt=True, return_dict=False)
    assert before + question_ids + after == text_ids  # the same prompt, token for token
    table = hf_model.get_input_embeddings().weight.detach()
    parts = [{"type": "text", "text": "Q:"}, {"type": "prompt_embeds", "prompt_embeds": table[question_ids]}]
    (embedded,) = llm.chat([{"role": "user", "content": parts}], GREEDY, use_tqdm=False)
    assert embedded.outputs[0].token_ids == hf_greedy(hf_model, GREEDY.max_tokens, input_ids=text_ids).token_ids
    assert embedded.num_prompt_tokens == len(text_ids)
    with pytest.raises(ValueError, match="content parts of type 'image_url' are not supported"):
        llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], GREEDY)


def test_a_prompt_mixing_token_ids_and_embeddings_continues_as_its_ids_do(llm, hf_model):
    """vLLM's prompt_is_token_ids: where the mask is False the row is the input. Rows that
    are the model's own embeddings of the ids there continue exactly as the ids do (HF's
    greedy tokens), at TP 2, over chunked steps (a 3-row budget per step) too; other rows
    continue otherwise."""
    ids = random_ids(21, 14, hf_model.config.vocab_size)
    table = hf_model.get_input_embeddings().weight.detach()
    is_token = [True] * 3 + [False] * 4 + [True] * 3 + [False] * 2 + [True] * 2
    mixed = {"prompt_token_ids": ids, "prompt_embeds": table[ids], "prompt_is_token_ids": is_token}
    reference = hf_greedy(hf_model, GREEDY.max_tokens, input_ids=ids).token_ids
    (output,) = llm.generate([mixed], GREEDY, use_tqdm=False)
    assert output.outputs[0].token_ids == reference and output.num_prompt_tokens == len(ids)
    noise = {**mixed, "prompt_embeds": torch.randn(len(ids), table.shape[1], generator=torch.Generator().manual_seed(0))}
    (other,) = llm.generate([noise], GREEDY, use_tqdm=False)
    assert other.outputs[0].token_ids != reference
    for bad, message in [({**mixed, "prompt_is_token_ids": is_token[:-1]}, "must have the same length"),
                         ({**mixed, "prompt_is_token_ids": [1] * len(ids)}, "a list of booleans"),
                         ({k: v for k, v in mixed.items() if k != "prompt_token_ids"}, "needs both")]:
        with pytest.raises(ValueError, match=message):
            llm.generate([bad], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="prompt_logprobs"):
        llm.generate([mixed], SamplingParams(max_tokens=2, prompt_logprobs=1), use_tqdm=False)
    # Only the rows the prompt takes are read: a NaN where a token id is the input is no error.
    ignored, taken = table[ids].clone(), table[ids].clone()
    ignored[0], taken[3] = float("nan"), float("nan")
    (same,) = llm.generate([{**mixed, "prompt_embeds": ignored}], GREEDY, use_tqdm=False)
    assert same.outputs[0].token_ids == reference
    with pytest.raises(ValueError, match="NaN or Inf"):
        llm.generate([{**mixed, "prompt_embeds": taken}], GREEDY, use_tqdm=False)


def test_a_mixed_prompts_blocks_are_cached_by_their_ids_and_rows(llm, hf_model):
    """Block size 16, 40 positions, embeddings rows at [20, 25): block 0 holds ids only and
    is keyed by them (shared with the same ids as a token-id prompt); block 1 by its ids
    and where its rows sit and their bytes."""
    ids = random_ids(23, 40, hf_model.config.vocab_size)
    table = hf_model.get_input_embeddings().weight.detach()
    is_token = [True] * 20 + [False] * 5 + [True] * 15
    mixed = {"prompt_token_ids": ids, "prompt_embeds": table[ids], "prompt_is_token_ids": is_token,
             "cache_salt": "mixed-blocks"}
    noise = {**mixed, "prompt_embeds": torch.randn(40, table.shape[1], generator=torch.Generator().manual_seed(1))}
    first, again, other, plain = (llm.generate([prompt], GREEDY, use_tqdm=False)[0]
                                  for prompt in (mixed, mixed, noise, {"prompt_token_ids": ids, "cache_salt": "mixed-blocks"}))
    assert (first.num_cached_tokens, again.num_cached_tokens, other.num_cached_tokens, plain.num_cached_tokens) \
        == (0, 32, 16, 16)
    assert again.outputs[0].token_ids == first.outputs[0].token_ids == plain.outputs[0].token_ids


def test_a_mixed_prompt_in_chunks_beside_other_prompts(ray_cluster, hf_model):
    with LLM(tensor_parallel_size=2, enable_prompt_embeds=True, max_model_len=256, max_num_batched_tokens=3,
             kv_cache_memory_bytes=32 << 20) as chunked:
        ids = random_ids(22, 11, hf_model.config.vocab_size)
        table = hf_model.get_input_embeddings().weight.detach()
        is_token = [False, False, True, True, True, False, True, False, False, False, True]
        prompts = [{"prompt_token_ids": ids, "prompt_embeds": table[ids], "prompt_is_token_ids": is_token},
                   {"prompt_token_ids": ids}, {"prompt_embeds": table[ids]}]
        outputs = chunked.generate(prompts, GREEDY, use_tqdm=False)
    reference = hf_greedy(hf_model, GREEDY.max_tokens, input_ids=ids).token_ids
    assert [o.outputs[0].token_ids for o in outputs] == [reference] * 3


def _generate_staggered(engine, prompts, params_list):
    """Submits prompts in three waves, each after the previous wave produced tokens."""
    results = {i: [] for i in range(len(prompts))}
    done = {i: threading.Event() for i in range(len(prompts))}
    progressed = {i: threading.Event() for i in range(len(prompts))}

    def sink_for(i):
        def sink(delta):
            results[i].extend(delta.new_token_ids)
            if len(results[i]) >= 3:
                progressed[i].set()
            if delta.finish_reason is not None:
                done[i].set()
        return sink

    waves = [[0, 1], [2, 3], [4, 5]]
    for wave in waves:
        for i in wave:
            engine.add_request(f"stagger-{i}", params_list[i], sink_for(i), tuple(prompts[i]))
        for i in wave:
            assert progressed[i].wait(60)
    for i in done:
        assert done[i].wait(60)
    return [results[i] for i in range(len(prompts))]


def test_continuous_batching_matches_each_alone(llm):
    vocab = llm.config.model_config.vocab_size
    lengths, max_tokens = [3, 40, 17, 70, 9, 33], [20, 6, 14, 9, 25, 12]
    prompts = [random_ids(i, n, vocab) for i, n in enumerate(lengths)]
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in max_tokens]
    alone = [llm.generate({"prompt_token_ids": p}, sp, use_tqdm=False)[0].outputs[0].token_ids
             for p, sp in zip(prompts, params)]
    together = _generate_staggered(llm.engine, prompts, params)
    assert together == alone
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks
    assert stats.num_running == 0 and stats.num_waiting == 0


def test_embeddings_prompts_put_in_groups_each_get_their_own_rows(llm, monkeypatch):
    """generate() sends its prompts a step's worth at a time (here 20 tokens, samples
    counted; the first group a quarter of that), each group's embeddings put as one object
    and its requests sent in one call per shard: every prompt, token ids among them and one
    with n=2, gets what it gets alone, and the groups sent are the ones step_groups cut."""
    import cluster.llm

    cut, step_groups = [], cluster.llm.step_groups

    def small_groups(checked, step_tokens):
        assert step_tokens == llm.config.max_num_batched_tokens
        for group in step_groups(checked, 20):
            cut.append([(prompt.num_tokens, sp.n) for prompt, sp in group])
            yield group

    hidden, dtype = llm.config.model_config.hidden_size, llm.config.torch_dtype
    gen = torch.Generator().manual_seed(11)
    prompts = [{"prompt_embeds": torch.randn(n, hidden, generator=gen).to(dtype)} for n in (5, 9, 3, 12, 7, 4, 6, 8)]
    prompts.insert(4, {"prompt_token_ids": random_ids(4, 10, llm.config.model_config.vocab_size)})
    params = [GREEDY] * len(prompts)
    params[6] = SamplingParams(temperature=0.8, seed=5, max_tokens=12, n=2)
    alone = [[c.token_ids for c in llm.generate(p, sp, use_tqdm=False)[0].outputs] for p, sp in zip(prompts, params)]
    monkeypatch.setattr(cluster.llm, "step_groups", small_groups)
    together = [[c.token_ids for c in o.outputs] for o in llm.generate(prompts, params, use_tqdm=False)]
    assert together == alone
    assert len({tuple(tokens[0]) for tokens in alone}) == len(prompts)  # the rows differ, so do the tokens
    assert cut == [[(5, 1)], [(9, 1), (3, 1), (12, 1)], [(10, 1), (7, 1), (4, 2)], [(6, 1), (8, 1)]]


def test_a_bad_prompt_after_a_sent_group_aborts_that_group(llm, monkeypatch):
    """Prompts are checked as their group is sent (vLLM's order): a bad one in a later
    group raises ValueError, the requests sent before it are aborted and their blocks
    freed, and the LLM keeps working."""
    import cluster.llm

    step_groups = cluster.llm.step_groups
    # groups of 4 tokens, the first of 1: the token ids, then the good embeddings, then the bad
    monkeypatch.setattr(cluster.llm, "step_groups", lambda checked, step_tokens: step_groups(checked, 4))
    long = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    before = llm.engine.stats()
    prompts = [{"prompt_token_ids": [5, 6, 7, 8]}, {"prompt_embeds": torch.randn(4, 256)},
               {"prompt_embeds": torch.full((4, 256), float("nan"))}]
    with pytest.raises(ValueError, match="NaN or Inf"):
        llm.generate(prompts, long, use_tqdm=False)
    wait_until(lambda: llm.engine.stats().num_aborted == before.num_aborted + 2, 30, "the sent group's aborts")
    after = llm.engine.stats()
    assert after.num_running == after.num_waiting == 0 and after.num_free_blocks == before.num_free_blocks
    assert llm.engine.num_unfinished == 0
    good = llm.generate(prompts[:2], GREEDY, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in good] == [GREEDY.max_tokens] * 2


def test_generate_keeps_at_most_its_bound_of_embeddings_in_the_engine(llm, monkeypatch):
    """Each shard holds an unfinished prompt's rows on its device, so generate() sends a
    group only while the unfinished prompts' embeddings stay within the engine's bound
    (2 GiB on CPU; here two prompts' worth, a group a prompt): never more than one prompt
    is running when the next is added, and every prompt gets what it gets without the
    bound."""
    import cluster.llm
    from cluster.engine_client import EMBEDS_IN_FLIGHT_MAX_BYTES

    assert llm.engine.max_embeds_in_flight_bytes == EMBEDS_IN_FLIGHT_MAX_BYTES  # no device memory to bound it

    hidden, dtype = llm.config.model_config.hidden_size, llm.config.torch_dtype
    gen = torch.Generator().manual_seed(12)
    prompts = [{"prompt_embeds": torch.randn(8, hidden, generator=gen).to(dtype)} for _ in range(6)]
    unbounded = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    step_groups, add_request, running = cluster.llm.step_groups, llm.engine.add_request, []

    def add_and_count(*args, **kwargs):
        running.append(llm.engine.num_unfinished)
        return add_request(*args, **kwargs)

    monkeypatch.setattr(llm.engine, "max_embeds_in_flight_bytes", 2 * 8 * hidden * dtype.itemsize)
    monkeypatch.setattr(cluster.llm, "step_groups", lambda checked, step_tokens: step_groups(checked, 1))
    monkeypatch.setattr(llm.engine, "add_request", add_and_count)
    bounded = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    assert bounded == unbounded and len(running) == len(prompts) and max(running) <= 1


def test_request_metrics_record_arrival_first_token_and_finish(llm):
    """RequestOutput.metrics, as vLLM's: per request, arrival <= first token <= last token
    <= finished, all within the generate() call; with n = 2, the first token of either."""
    vocab = llm.config.model_config.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, n=2)
    start = time.time()
    outputs = llm.generate([{"prompt_token_ids": random_ids(i, 8, vocab)} for i in range(3)], params,
                           use_tqdm=False)
    end = time.time()
    for output in outputs:
        m = output.metrics
        assert start <= m.arrival_time < m.first_token_time <= m.last_token_time <= m.finished_time <= end
        assert m.time_to_first_token == m.first_token_time - m.arrival_time
    assert outputs[0].metrics.arrival_time <= outputs[2].metrics.arrival_time


def test_preemption_under_kv_pressure_keeps_outputs(ray_cluster):
    # 20 blocks of 16 tokens: six 60-token requests cannot all be resident at once.
    with LLM(tensor_parallel_size=2, max_model_len=256, kv_cache_memory_bytes=20 * 32 * 1024) as small:
        vocab = small.config.model_config.vocab_size
        prompts = [{"prompt_token_ids": random_ids(100 + i, 40, vocab)} for i in range(6)]
        params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
        together = [o.outputs[0].token_ids for o in small.generate(prompts, params, use_tqdm=False)]
        alone = [small.generate(p, params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
        assert together == alone
        stats = small.engine.stats()
        assert stats.num_free_blocks == stats.num_total_blocks


def test_seeded_sampling_is_reproducible_and_n_samples_differ(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=16, n=3, ignore_eos=True)
    first = llm.generate("Once upon a time", params, use_tqdm=False)[0]
    second = llm.generate(["Once upon a time", "noise"], params, use_tqdm=False)[0]
    assert [c.token_ids for c in first.outputs] == [c.token_ids for c in second.outputs]
    assert [c.index for c in first.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in first.outputs}) > 1


def test_stop_string_cuts_text(llm):
    reference = llm.generate("The sky is", GREEDY, use_tqdm=False)[0].outputs[0]
    stop = reference.text[4:7]
    assert stop and stop.strip()
    cut = llm.generate("The sky is", SamplingParams(temperature=0.0, max_tokens=12, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == reference.text[: reference.text.index(stop)]


BAD_EMBEDS = {
    "wrong hidden size": (torch.randn(4, 17), "expected shape (seq_len, 256), got (4, 17)"),
    "1-D": (torch.randn(256), "expected shape (seq_len, 256), got (256,)"),
    "3-D with batch > 1": (torch.randn(2, 4, 256), "expected shape (seq_len, 256), got (2, 4, 256)"),
    "integer dtype": (torch.ones(4, 256, dtype=torch.int64), "floating dtype"),
    "NaN": (torch.full((4, 256), float("nan")), "NaN or Inf"),
    "Inf": (torch.full((4, 256), float("inf")), "NaN or Inf"),
    "empty": (torch.empty(0, 256), "at least one row"),
    "sparse": (torch.randn(4, 256).to_sparse(), "dense"),
    "not a tensor": ([[0.0] * 256], "must be a torch.Tensor"),
}


@pytest.mark.parametrize("case", list(BAD_EMBEDS))
def test_bad_prompt_embeds_raise_and_llm_keeps_working(llm, case):
    tensor, message = BAD_EMBEDS[case]
    with pytest.raises(ValueError, match=_escape(message)):
        llm.generate([{"prompt_token_ids": [5, 6, 7]}, {"prompt_embeds": tensor}], GREEDY, use_tqdm=False)
    good = llm.generate({"prompt_embeds": torch.randn(4, 256)}, GREEDY, use_tqdm=False)[0]
    assert len(good.outputs[0].token_ids) == GREEDY.max_tokens


@pytest.mark.parametrize("prompt, message", [
    ({"prompt_token_ids": [1, 10**9]}, "integers in"),
    ({"prompt_token_ids": []}, "non-empty"),
    ({"prompt": "x", "prompt_token_ids": [1]}, "exactly one of"),
    ({"prompt_token_ids": list(range(5, 260))}, "maximum context length"),
    (42, "must be a string or a dict"),
    ({"prompt_token_ids": [1, 2], "cache_salt": ""}, "cache_salt must be a non-empty string"),
])
def test_bad_prompts_raise(llm, prompt, message):
    with pytest.raises(ValueError, match=message):
        llm.generate(prompt, GREEDY, use_tqdm=False)
    assert llm.generate("still serving", GREEDY, use_tqdm=False)[0].outputs[0].token_ids


def test_a_cache_salt_shares_cached_prefixes_only_within_the_salt(llm):
    """vLLM's cache_salt through Ray to the leader: a repeat finds the prompt's full blocks
    (two of 16 tokens) only under the same salt, or with none under none; outputs agree."""
    ids, rows = random_ids(21, 40, 1536), torch.randn(40, 256, generator=torch.Generator().manual_seed(21))
    for prompt in ({"prompt_token_ids": ids}, {"prompt_embeds": rows}):
        cached, texts = [], set()
        for salt in ("tenant-1", "tenant-2", None, "tenant-1", None, "tenant-2"):
            salted = {**prompt, "cache_salt": salt} if salt else prompt
            (output,) = llm.generate(salted, GREEDY, use_tqdm=False)
            cached.append(output.num_cached_tokens)
            texts.add(tuple(output.outputs[0].token_ids))
        assert cached == [0, 0, 0, 32, 32, 32] and len(texts) == 1


def test_embeddings_without_flag_raise(ray_cluster):
    with LLM(max_model_len=128) as plain:
        with pytest.raises(ValueError, match="enable_prompt_embeds=True"):
            plain.generate({"prompt_embeds": torch.randn(3, 256)}, GREEDY, use_tqdm=False)
        assert plain.generate("hello", GREEDY, use_tqdm=False)[0].outputs[0].token_ids


def _escape(text: str) -> str:
    import re

    return re.escape(text)


def test_profile_writes_a_trace_and_table_per_rank(llm, tmp_path):
    """start_profile / stop_profile: every rank's step-loop work (its model's matmuls)
    is in its own trace; stopping twice is an error that names the fix."""
    llm.start_profile()
    llm.generate([{"prompt_token_ids": random_ids(7, 10, 1536)}], GREEDY, use_tqdm=False)
    paths = llm.stop_profile(str(tmp_path / "profile"))
    assert sorted(p.rsplit("/", 1)[1] for p in paths) == ["rank0.json", "rank0.txt", "rank1.json", "rank1.txt"]
    for rank in (0, 1):
        trace = (tmp_path / "profile" / f"rank{rank}.json").read_text()
        assert '"aten::linear"' in trace or '"aten::addmm"' in trace or '"aten::mm"' in trace
        assert "Self CPU" in (tmp_path / "profile" / f"rank{rank}.txt").read_text()
    with pytest.raises(Exception, match="start_profile first"):
        llm.stop_profile(str(tmp_path / "again"))
    assert llm.generate([{"prompt_token_ids": random_ids(8, 5, 1536)}], GREEDY, use_tqdm=False)[0].outputs[0].token_ids


def test_truncate_prompt_tokens_generates_from_the_last_tokens_and_rows(llm):
    """vLLM's SamplingParams.truncate_prompt_tokens: a prompt's last k token ids, or
    embedding rows, exactly as if only those were sent; -1 keeps max_model_len of them."""
    ids = list(range(20, 60))
    rows = torch.randn(12, llm.config.model_config.hidden_size, generator=torch.Generator().manual_seed(4))
    greedy = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    cut = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, truncate_prompt_tokens=7)
    truncated = llm.generate([{"prompt_token_ids": ids}, {"prompt_embeds": rows}], cut, use_tqdm=False)
    direct = llm.generate([{"prompt_token_ids": ids[-7:]}, {"prompt_embeds": rows[-7:]}], greedy, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in truncated] == [o.outputs[0].token_ids for o in direct]
    assert truncated[0].prompt_token_ids == ids[-7:]
    whole = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, truncate_prompt_tokens=-1)
    assert llm.generate([{"prompt_token_ids": ids}], whole, use_tqdm=False)[0].prompt_token_ids == ids
    with pytest.raises(ValueError, match="truncate_prompt_tokens .* is greater than max_model_len"):
        llm.generate(["hi"], SamplingParams(truncate_prompt_tokens=10**6), use_tqdm=False)
