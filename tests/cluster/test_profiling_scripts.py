"""The profiling scripts run as written (default model, CPU): per-rank phase timers that
count every step, first-token medians for both prompt kinds and the per-rank kernel table
(on the session's Ray, at TP 2), the in-process step-loop table, and the object-store
hand-off of embeddings."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def test_profile_shards_times_every_step_on_every_rank(ray_cluster, capsys):
    main = runpy.run_path(str(SCRIPTS / "profile_shards.py"))["main"]
    leader, follower = main(["-tp", "2", "--prompt-len", "16", "--max-tokens", "8", "--max-model-len", "128"])
    # One step a token (the prefill samples the first). The follower was already waiting
    # for the first plan when the timers went in, so its first wait is not counted.
    assert leader["execute"][1] == follower["execute"][1] == 8
    assert follower["broadcast_object"][1] == 7 and "_launch" in leader and "_launch" not in follower
    assert leader["results(wait)"][1] == 8 and all(mean >= 0 for mean, _ in leader.values())
    # Device events (host clocks on CPU): every step's span, the period between step ends.
    for rank in (leader, follower):
        span, steps = rank["device: execute span (median)"]
        period, gaps = rank["device: step period (median)"]
        assert steps == 8 and gaps == 7 and 0 < span and 0 < period
    out = capsys.readouterr().out
    assert "TP=2: 8 tokens" in out and out.count("rank 0") == out.count("rank 1") == 2


def test_probe_first_token_reports_both_prompt_kinds(ray_cluster, capsys):
    main = runpy.run_path(str(SCRIPTS / "probe_first_token.py"))["main"]
    result = main(["-tp", "2", "--prompt-len", "8", "--repeats", "3", "--max-model-len", "128"])
    assert result["median token ids (ms)"] > 0 and result["median prompt_embeds (ms)"] > 0
    assert result["ratio"] == result["median prompt_embeds (ms)"] / result["median token ids (ms)"]
    assert result["median put of the embeddings (ms)"] > 0
    assert "TP=2, 8-row prompt, 3 repeats" in capsys.readouterr().out


def test_probe_first_token_timeline_orders_each_ranks_phases(ray_cluster, capsys):
    main = runpy.run_path(str(SCRIPTS / "probe_first_token.py"))["main"]
    main(["-tp", "2", "--prompt-len", "8", "--repeats", "2", "--max-model-len", "128", "--timeline"])
    out = capsys.readouterr().out
    table = out.split("enter -> exit\n", 1)[1].splitlines()[1:]
    rows = {(line[:6].strip(), line[7:35].strip()): line[35:] for line in table if not line.startswith("TP=")}
    for rank in ("0", "1"):
        for phase in ("add_request (fetch embeds)", "intake put", "plan broadcast", "apply plan", "execute"):
            assert (rank, phase) in rows, (rank, phase)
    assert ("0", "outbox put") in rows and ("1", "outbox put") not in rows
    for phase in ("parse prompt", "check rows", "check length", "put embeds"):
        assert ("driver", phase) in rows, phase
    from cluster import prompts

    assert prompts.validate_prompt_embeds.__name__ == "validate_prompt_embeds", "the probe left its stamp on the module"

    def exits(rank, phase):  # (token ids, prompt_embeds) median exit times
        cells = rows[(rank, phase)].split()
        return float(cells[2]), float(cells[5])

    # Within a rank, phases end in the order a first token passes through them.
    for ids_or_embeds in (0, 1):
        order = [exits("0", phase)[ids_or_embeds] for phase in ("intake put", "apply plan", "execute", "outbox put")]
        assert order == sorted(order)


def test_probe_first_token_times_a_batch_with_the_prefix_cache_on(ray_cluster, capsys):
    """Several prompts a call, with the cache kept but every call salted, each generating 3
    tokens: each timeline cell spans the batch (first entry -> last exit), and rank 0 counts
    a step for each token."""
    main = runpy.run_path(str(SCRIPTS / "probe_first_token.py"))["main"]
    result = main(["-tp", "2", "--prompt-len", "8", "--repeats", "2", "--max-model-len", "128",
                   "--num-prompts", "3", "--max-tokens", "3", "--enable-prefix-caching", "--timeline", "--steps",
                   "--fresh-rows"])
    assert result["median token ids (ms)"] > 0 and result["median prompt_embeds (ms)"] > 0
    out = capsys.readouterr().out
    assert "TP=2, 3 prompts of 8 rows, 3 tokens each, prefix cache on (salted calls), 2 repeats" in out
    table = out.split("enter -> exit\n", 1)[1].splitlines()[1:]
    rows = {(line[:6].strip(), line[7:35].strip()): line[35:].split() for line in table if not line.startswith("TP=")}
    enter, _, exit_ = rows[("0", "add_request (fetch embeds)")][3:6]  # the embeddings column
    assert float(enter) <= float(exit_)
    # The driver's time in each phase, summed over the batch's calls: the rows' check is part
    # of parsing, so it takes no longer than the parsing that holds it.
    busy = out.split("driver, prompt_embeds: ms in each phase, summed over its calls (median of repeats): ", 1)[1]
    spent = dict(item.rsplit(" ", 1) for item in busy.splitlines()[0].split(", "))
    assert 0 < float(spent["check rows"]) <= float(spent["parse prompt"]), spent
    leader = out.split("rank 0, prompt_embeds: calls / ms in each phase, summed (median of repeats): ", 1)[1]
    calls = {phase: float(count) for phase, count in
             (item.rsplit(" / ", 1)[0].rsplit(" ", 1) for item in leader.splitlines()[0].split(", "))}
    assert calls["execute"] >= 3 and calls["sampler launch"] >= 3, calls
    # --steps: rank 0's steps one by one, for each kind: at least a prefill and two decodes,
    # each with rows and times; the last has no next step to give it a period.
    for steps in printed_steps(out, kinds=2):
        assert len(steps) >= 3, steps
        rows, host, device, period = zip(*steps)
        assert all(float(r) >= 1 for r in rows) and all(float(ms) > 0 for ms in host + device)
        assert period[-1] == "-" and all(float(ms) > 0 for ms in period[:-1])


def printed_steps(out: str, kinds: int) -> list[list[list[str]]]:
    """print_steps' table read back: per kind, its steps' cells (rows, host, device, period).
    Each kind's cells are 36 characters wide, "-" past its last step: the kinds' step counts
    may differ (when each group reaches the engine decides how its steps fall)."""
    lines = out.split("period ms to the next step\n", 1)[1].splitlines()[1:]
    lines = lines[:next(i for i, line in enumerate(lines) if line.lstrip().startswith("sum"))]
    assert [int(line[:4]) for line in lines] == list(range(len(lines)))
    per_kind = []
    for first in range(4, 4 + 36 * kinds, 36):
        cells = [line[first:first + 36].split() for line in lines]
        steps = cells[:next((i for i, cell in enumerate(cells) if cell == ["-"]), len(cells))]
        assert all(cell == ["-"] for cell in cells[len(steps):]), cells
        per_kind.append(steps)
    return per_kind


def test_the_steps_table_marks_the_steps_a_kind_did_not_take(capsys):
    from scripts.step_events import CallSteps, print_steps

    three = [(40, 1.0, 2.0, 3.0), (2, 0.5, 1.0, 1.5), (2, 0.5, 1.0, None)]
    four = [(30, 1.0, 2.0, 3.0), (10, 1.0, 2.0, 3.0)] + three[1:]
    print_steps({"token ids": [CallSteps(three, 1.0, 9.0)], "prompt_embeds": [CallSteps(four, 2.0, 12.0)]})
    ids, embeds = printed_steps(capsys.readouterr().out, kinds=2)
    assert [cell[0] for cell in ids] == ["40", "2", "2"] and [cell[0] for cell in embeds] == ["30", "10", "2", "2"]
    assert ids[-1][3] == embeds[-1][3] == "-"


def test_probe_step_rows_keeps_a_calls_steps_with_their_periods():
    from scripts.step_events import step_rows

    steps = [(5, 9.0, 9.1, 1.0), (24, 10.0, 10.010, 8.0), (3, 10.015, 10.020, 4.0), (3, 10.030, 10.031, 1.5)]
    rows = step_rows(steps, start=9.5)  # the step before the call is left out
    assert [r[0] for r in rows] == [24, 3, 3] and [r[2] for r in rows] == [8.0, 4.0, 1.5]
    assert [round(r[1], 6) for r in rows] == [10.0, 5.0, 1.0]
    assert [round(r[3], 6) for r in rows[:2]] == [15.0, 15.0] and rows[2][3] is None


def test_profile_step_loop_op_table(capsys):
    main = runpy.run_path(str(SCRIPTS / "profile_step_loop.py"))["main"]
    main(["--num-prompts", "2", "--input-len", "8", "--output-len", "1", "--max-num-seqs", "1",
          "--max-model-len", "64", "--op-table", "5"])
    tables = _op_tables(capsys.readouterr().out)
    # By host time, and on CUDA by device time too; five ops each.
    assert [len(ops) for ops in tables] == [5] * (2 if torch.cuda.is_available() else 1)
    if not torch.cuda.is_available():  # on CUDA the host runs the steps as graph replays
        # The step loop's own thread is profiled: its matmuls show up.
        assert "aten::mm" in tables[0] or "aten::addmm" in tables[0]


def _op_tables(out: str) -> list[list[str]]:
    """The op names of each table torch.profiler printed: the rows between the dashes
    under the header that starts with Name and the next dashes."""
    lines = out.splitlines()
    tables = []
    for i, line in enumerate(lines):
        if line.strip().startswith("Name ") and lines[i + 1].startswith("---"):
            end = next(j for j in range(i + 2, len(lines)) if lines[j].startswith("---"))
            tables.append([row.split()[0] for row in lines[i + 2:end]])
    return tables


def test_profile_step_loop_resolves_dtype_auto_as_llm_does():
    """--dtype auto (the default) is the checkpoint's dtype on CUDA; it reached the engine
    as "auto" and was refused there, on every GPU host (session 21)."""
    script = runpy.run_path(str(SCRIPTS / "profile_step_loop.py"))
    parse_args, engine_config = script["parse_args"], script["engine_config"]
    shape = ["--model-shape", "llama-3.2-1b", "--load-format", "dummy"]
    assert engine_config(parse_args(shape), cuda=True).dtype == "bfloat16"
    assert engine_config(parse_args(shape + ["--dtype", "float16"]), cuda=True).dtype == "float16"
    assert engine_config(parse_args([]), cuda=True).dtype == "float32"  # the built-in model's own
    assert engine_config(parse_args(shape), cuda=False).dtype == "float32"


def test_profile_step_loop_accounts_for_every_step(capsys):
    main = runpy.run_path(str(SCRIPTS / "profile_step_loop.py"))["main"]
    result = main(["--num-prompts", "6", "--input-len", "12", "--output-len", "5",
                   "--max-num-batched-tokens", "64", "--max-num-seqs", "4", "--max-model-len", "64"])
    rows = result["rows"]
    # 6 prompts through 4 seats: decodes of at most 4 rows, mixed steps as seats free up,
    # and the table accounts for every launched step the script counted.
    steps = sum(n for n, *_ in rows.values())
    assert steps == int(capsys.readouterr().out.split(" steps")[0].rsplit(", ", 1)[1])
    assert max(bucket for kind, bucket in rows if kind == "decode") <= 4
    assert any(kind == "mixed" for kind, _ in rows) and result["wall_s"] > 0


def test_bench_object_store_times_the_embeddings_hand_off_beside_token_ids(ray_cluster, capsys):
    main = runpy.run_path(str(SCRIPTS / "bench_object_store.py"))["main"]
    result = main(["--rows", "8", "--hidden", "32", "--num-actors", "2", "--repeats", "3"])
    for mode in ("token ids", "prompt_embeds"):
        assert 0 < result[f"{mode}: send -> run (ms)"] < result[f"{mode}: round trip (ms)"]
    assert result["prompt_embeds: ray.put (ms)"] > 0
    out = capsys.readouterr().out
    assert "8 x 32 bfloat16" in out and "to 2 actor(s), medians of 3" in out and "object store" in out


def test_bench_latency_reports_the_speedup_over_a_baseline_size_in_one_run(ray_cluster, capsys):
    main = runpy.run_path(str(SCRIPTS / "bench_latency.py"))["main"]
    report = main(["-tp", "2", "--baseline-tp", "1", "--speedup-goal", "1.6", "--input-len", "8",
                   "--output-len", "6", "--num-iters", "1", "--max-model-len", "64"])
    assert report["token ids ms/step"] > 0 and report["baseline ms/step"] > 0
    assert report["speedup"] == pytest.approx(report["baseline ms/step"] / report["token ids ms/step"])
    out = capsys.readouterr().out
    assert "model=" in out and "tp=2" in out
    assert f"TP=2 over TP=1 (same run): {report['speedup']:.3f}x tokens/s" in out and "goal 1.6x" in out


def test_probe_arrivals_times_each_phase(ray_cluster, capsys):
    main = runpy.run_path(str(SCRIPTS / "probe_arrivals.py"))["main"]
    rows = main(["--rates", "50", "--num-prompts", "12", "--c1-prompts", "3", "--input-len", "8",
                 "--output-len", "4", "--max-model-len", "128", "--kv-cache-memory-bytes", str(16 << 20)])
    assert list(rows) == ["c1", "50 req/s", "c1 again"]
    assert [row["requests"] for row in rows.values()] == [3, 12, 3]
    for row in rows.values():
        assert 0 < row["median TTFT (ms)"] <= row["p90 TTFT (ms)"] and row["median TPOT (ms)"] > 0
    assert "50 req/s" in capsys.readouterr().out


def test_profile_kernels_names_each_ranks_all_reduce_and_writes_its_trace(ray_cluster, capsys):
    main = runpy.run_path(str(SCRIPTS / "profile_kernels.py"))["main"]
    by_rank = main(["-tp", "2", "--prompt-len", "8", "--max-tokens", "4", "--max-model-len", "128"])
    assert sorted(by_rank) == [0, 1]  # a trace from each rank; CPU runs launch no kernels
    out = capsys.readouterr().out
    assert "rank 0 all-reduce: gloo only (CPU)" in out and "rank 1 all-reduce: gloo only (CPU)" in out
    assert "rank 0: 0 kernels" in out and "rank 1: 0 kernels" in out


def test_profile_kernels_sums_a_trace_by_kernel_name(tmp_path):
    kernels_by_name = runpy.run_path(str(SCRIPTS / "profile_kernels.py"))["kernels_by_name"]
    trace = tmp_path / "rank0.json"
    trace.write_text(json.dumps({"traceEvents": [
        {"cat": "kernel", "name": "_gemv_kernel", "dur": 17.0},
        {"cat": "kernel", "name": "_gemv_kernel", "dur": 19.0},
        {"cat": "kernel", "name": "_lamport_all_reduce_kernel", "dur": 2.5},
        {"cat": "cpu_op", "name": "aten::mm", "dur": 40.0},  # host ops are not kernels
    ]}))
    assert kernels_by_name(str(trace)) == {"_gemv_kernel": (36.0, 2), "_lamport_all_reduce_kernel": (2.5, 1)}
