"""Mixed steps through the captured graphs (ModelRunner's _execute_in_graphs): a step of
up to the prefill graphs' span capacity in requests is one replay of the prefill graphs,
decodes as one-row spans; a step of more requests is one decode-graph replay and one
prefill-graph replay per prefill. On CPU the graphs' padded steps run eagerly with the kernels in
Triton's interpreter (on CUDA the graphs replay the same inputs); each step's logits, in
the step's order of sampled rows, and every real cache block must equal the plain eager
step's: prefills alone, decodes beside a prefill of embedding rows, decodes around a chunk
that samples nothing, and a step of more prefills than MAX_GRAPH_PREFILLS (eager in both).
At tensor_parallel_size 2 (two forked ranks over gloo) both ranks replay the same graphs
and their logits equal TP 1's eager ones."""

from __future__ import annotations

from tests.workers.conftest import KERNELS_ON, ON_TWO_FORKED_RANKS, run_in_triton_interpreter

COMMON = KERNELS_ON + """
import sys
import torch
from workers import model_runner
from workers.config import EngineConfig, ModelConfig
from workers.intake import Intake, RequestState
from workers.messages import ScheduledRequest as S, StepPlan
from workers.model_runner import ModelRunner
from workers.parallel import ProcessGroup


def new_runner(path, graphs, max_spans, max_num_seqs, pg=None):
    pg = pg or ProcessGroup()
    config = EngineConfig(model=path, model_config=ModelConfig.from_pretrained(path), max_model_len=64,
                          block_size=4, kv_cache_memory_bytes=1 << 20, max_num_seqs=max_num_seqs,
                          tensor_parallel_size=pg.world_size)
    runner = ModelRunner(config, pg, torch.device("cpu"))
    assert runner.decode_graphs is None and runner.prefill_graphs is None  # CPU: nothing captured
    if graphs:
        runner.decode_graphs = runner.new_decode_graphs()
        runner.prefill_graphs = runner.new_prefill_graphs(max_spans=max_spans)
    return runner


def run_steps(runner, intake, steps):
    # Applies and executes each (scheduled, appended tokens) step: each step's logits, the
    # graphs' loads, the model's passes in each step (a graph's padded step, run eagerly
    # here, is one pass a replay).
    model_forward = runner.model.forward
    passes, logits = [], []
    def counted(*args, **kwargs):
        passes[-1] += 1
        return model_forward(*args, **kwargs)
    for i, (scheduled, appended) in enumerate(steps):
        runner.apply(StepPlan(i, appended, (), (), scheduled), intake, 1.0)
        passes.append(0)
        runner.model.forward = counted
        logits.append(runner.execute(scheduled))
        runner.model.forward = model_forward
    loads = (runner.decode_graphs.staging.loads, runner.prefill_graphs.staging.loads) if runner.decode_graphs else None
    return logits, loads, passes


def run(path, graphs, pg=None, max_spans=16):
    runner = new_runner(path, graphs, max_spans, max_num_seqs=8, pg=pg)
    config = runner.config
    gen = torch.Generator().manual_seed(0)
    embeds = torch.randn(9, config.model_config.hidden_size, generator=gen)
    intake = Intake()
    # a: 36 rows, over one program's query rows (the kernel's block map gives it several)
    for req_id, prompt in [("a", list(range(3, 39))), ("b", [7, 8, 9, 10, 11, 12]), ("d", list(range(20, 28)))]:
        intake.put(RequestState(req_id, len(prompt), prompt, None))
    intake.put(RequestState("c", 9, None, embeds))
    for i in range(5):
        intake.put(RequestState(f"e{i}", 2, [30 + i, 40 + i], None))
    steps = [
        ((S("a", 0, 36, tuple(range(1, 10)), True), S("b", 0, 6, (11, 12), True)), ()),  # two prefills
        ((S("a", 36, 1, (10,), True), S("b", 6, 1, (), True), S("c", 0, 9, (13, 14, 15), True)),
         (("a", 50), ("b", 51))),  # decodes, then a prefill of embedding rows
        ((S("a", 37, 1, (), True), S("d", 0, 8, (16, 17), False), S("c", 9, 1, (), True), S("b", 7, 1, (), True)),
         (("a", 52), ("b", 53), ("c", 54))),  # a chunk that samples nothing, between decodes
        (tuple(S(f"e{i}", 0, 2, (18 + i,), True) for i in range(5)), ()),  # past MAX_GRAPH_PREFILLS
    ]
    logits, loads, passes = run_steps(runner, intake, steps)
    caches = [torch.stack(pair)[:, : runner.num_blocks] for pair in runner.kv_caches]
    return logits, caches, loads, passes

"""

TP1_SCRIPT = COMMON + """
assert model_runner.MAX_GRAPH_PREFILLS == 4
for path in sys.argv[1:]:
    plain, plain_caches, _, plain_calls = run(path, graphs=False)
    # (prefill graphs' span capacity, (decode graph loads, prefill graph loads), model passes a step)
    for max_spans, want_loads, want_calls in [
        (16, (0, 4), [1, 1, 1, 1]),  # every step one replay, decodes as one-row spans
        (3, (1, 3), [1, 1, 2, 1]),  # step 3's four requests: decodes' graph, then the chunk's; step 4 eager
    ]:
        graphed, graphed_caches, loads, graphed_calls = run(path, graphs=True, max_spans=max_spans)
        assert loads == want_loads and graphed_calls == want_calls, (max_spans, loads, graphed_calls)
        assert plain_calls == [1, 1, 1, 1] and [x.shape[0] for x in graphed] == [2, 3, 3, 5]
        for step, (a, b) in enumerate(zip(plain, graphed)):
            torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4, msg=f"{path} {max_spans} step {step}")
        for layer, (a, b) in enumerate(zip(plain_caches, graphed_caches)):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5, msg=f"{path} {max_spans} layer {layer} cache")
print("checked")
"""


TP2_SCRIPT = COMMON + ON_TWO_FORKED_RANKS + """
def graphed(pg):
    logits, _, loads, _ = run(path, graphs=True, pg=pg)
    return loads, [x.numpy().copy() for x in logits]


path = sys.argv[1]
reference = run(path, graphs=False)[0]
by_rank = on_two_forked_ranks(graphed)
for rank, (loads, logits) in sorted(by_rank.items()):
    assert loads == (0, 4), (rank, loads)  # both ranks replay the same graphs in the same order
    for step, (got, want) in enumerate(zip(logits, reference)):
        torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-4, rtol=1e-4, msg=f"rank {rank} step {step}")
print("checked")
"""


MANY_SCRIPT = COMMON + """
from workers.cuda_graphs import MAX_GRAPH_SPANS


def run_many(path, graphs, max_spans=MAX_GRAPH_SPANS):
    \"\"\"20 prefills in one step, then 17 decodes beside a prefill of embedding rows: more
    requests a step than the split path takes (MAX_GRAPH_PREFILLS) or than 16 spans (the
    span capacity before session 30).\"\"\"
    runner = new_runner(path, graphs, max_spans, max_num_seqs=24)
    intake = Intake()
    lengths = [2 + i % 3 for i in range(20)]
    for i, n in enumerate(lengths):
        intake.put(RequestState(f"r{i}", n, [10 + i + j for j in range(n)], None))
    embeds = torch.randn(9, runner.config.model_config.hidden_size, generator=torch.Generator().manual_seed(1))
    intake.put(RequestState("c", 9, None, embeds))
    steps = [
        (tuple(S(f"r{i}", 0, n, (1 + 2 * i, 2 + 2 * i), True) for i, n in enumerate(lengths)), ()),
        (tuple(S(f"r{i}", lengths[i], 1, (), True) for i in range(17)) + (S("c", 0, 9, (50, 51, 52), True),),
         tuple((f"r{i}", 40 + i) for i in range(20))),
    ]
    return run_steps(runner, intake, steps)


assert MAX_GRAPH_SPANS >= 21
path = sys.argv[1]
plain, _, plain_passes = run_many(path, graphs=False)
assert plain_passes == [1, 1] and [x.shape[0] for x in plain] == [20, 18]
# (span capacity, (decode graph loads, prefill graph loads), model passes a step)
for max_spans, want_loads, want_passes in [
    (MAX_GRAPH_SPANS, (0, 2), [1, 1]),  # each step one replay
    (16, (1, 1), [1, 2]),  # 20 prefills: eager; 18 requests: the decodes' graph, then the prefill's
]:
    graphed, loads, passes = run_many(path, graphs=True, max_spans=max_spans)
    assert loads == want_loads and passes == want_passes, (max_spans, loads, passes)
    for step, (a, b) in enumerate(zip(plain, graphed)):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4, msg=f"{max_spans} step {step}")
print("checked")
"""


def test_steps_of_many_requests_in_one_replay_equal_eager_steps_in_triton_interpreter(tiny_checkpoints):
    run_in_triton_interpreter(MANY_SCRIPT, str(tiny_checkpoints("llama")))


def test_mixed_steps_in_graphs_equal_eager_steps_in_triton_interpreter(tiny_checkpoints):
    run_in_triton_interpreter(TP1_SCRIPT, str(tiny_checkpoints("llama")))


def test_mixed_steps_in_graphs_at_tp2_equal_tp1_eager_in_triton_interpreter(tiny_checkpoints):
    run_in_triton_interpreter(TP2_SCRIPT, str(tiny_checkpoints("llama")))
