"""scripts/bench_offline.py with --enable-prefix-caching: the engine keeps its prefix cache,
yet no timed run (nor the warm-up) finds a block of another in it, for token ids and
embeddings alike, since each run's prompts carry a cache_salt of their own; the hashing of
the embeddings rows is still paid."""

from __future__ import annotations

import time

from cluster import LLM, SamplingParams
from scripts.bench_offline import kept_round, time_kinds
from scripts.step_events import LeaderSteps


def test_salted_runs_pay_the_cache_but_never_hit_it(ray_cluster, capsys):
    with LLM(enable_prompt_embeds=True, max_model_len=128) as llm:
        assert llm.config.enable_prefix_caching
        vocab = llm.config.model_config.vocab_size
        workload = [([(7 * i + j) % (vocab - 20) + 10 for j in range(40)], 2) for i in range(2)]  # 2 full blocks each
        leader = LeaderSteps(llm)
        best = time_kinds(llm, workload, batch=2, kinds=[False, True], rounds=2, leader=leader)
        stats = llm.engine.stats()
        # Six runs of each kind of the same two prompts (warm-up and rounds): unsalted, every
        # run after the first would find both prompts' two full blocks cached.
        assert stats.prefix_cache_queries >= 2 * 3 * 2 * 40
        assert stats.prefix_cache_hits == 0
        assert set(best) == {False, True} and all(seconds > 0 for seconds, _ in best.values())
        # --steps: rank 0's steps of each kind, one by one.
        out = capsys.readouterr().out
        assert "batch 2:" in out and "token ids: call " in out and "prompt_embeds: call " in out
        # Every row a call computes is in one of its steps: both prompts' 40 rows, then one
        # decode row each for the second token.
        started = time.time()
        llm.generate([{"prompt_token_ids": p} for p, _ in workload], SamplingParams(max_tokens=2, ignore_eos=True))
        call = leader.take(started, time.time())
        steps = call.steps
        assert sum(rows for rows, *_ in steps) == 2 * 40 + 2
        assert all(host > 0 and device > 0 for _, host, device, _ in steps) and steps[-1][3] is None
        # The call holds its steps: they begin after it, and it returns after the last.
        assert 0 < call.lead_ms < call.call_ms and 0 < call.after_ms < call.call_ms


def test_a_kind_keeps_its_fastest_or_its_median_round():
    runs = [(0.30, 9.0), (0.26, 7.0), (0.41, 8.0), (0.28, 6.0)]
    assert kept_round(runs, "fastest") == (0.26, 7.0)
    assert kept_round(runs, "median") == (0.28, 6.0)  # the lower of the middle two: a run that happened
    assert kept_round(runs[:3], "median") == (0.30, 9.0)
    assert kept_round(runs[:1], "median") == kept_round(runs[:1], "fastest") == (0.30, 9.0)
