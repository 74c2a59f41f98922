"""Prefill graphs: one request's prefill step padded to a row-count bucket, as a second
span of padding rows whose keys live in the scratch block. On CPU the padded step runs
eagerly with the kernels in Triton's interpreter (the graph replays the same inputs on
CUDA) and must give the unpadded step's logits and leave every real cache block as the
unpadded steps do: chunked prompts, a chunk that fills its bucket, embedding rows beside
token ids, padding wider than a cache block, Mistral's sliding window, decodes after, a
prompt mixing token ids and embedding rows in two chunks. At
tensor_parallel_size 2 (two forked ranks over gloo) both ranks' padded logits equal
TP 1's unpadded ones."""

from __future__ import annotations

from tests.workers.conftest import KERNELS_ON, ON_TWO_FORKED_RANKS, run_in_triton_interpreter

COMMON = KERNELS_ON + """
import sys
import torch
from workers.config import EngineConfig, ModelConfig
from workers.intake import Intake, RequestState
from workers.messages import ScheduledRequest, StepPlan
from workers.model_runner import ModelRunner
from workers.parallel import ProcessGroup


def run(path, padded, pg=None):
    pg = pg or ProcessGroup()
    config = EngineConfig(model=path, model_config=ModelConfig.from_pretrained(path), max_model_len=64,
                          max_num_batched_tokens=64, block_size=4, kv_cache_memory_bytes=1 << 20,
                          tensor_parallel_size=pg.world_size)
    runner = ModelRunner(config, pg, torch.device("cpu"))
    assert runner.prefill_graphs is None  # CPU: nothing captured
    graphs = runner.new_prefill_graphs()
    assert graphs.buckets == [16, 32, 64]  # to the step's limit, max_num_batched_tokens
    if padded:
        runner.prefill_graphs = graphs
    hidden = config.model_config.hidden_size
    embeds = torch.randn(26, hidden, generator=torch.Generator().manual_seed(0))
    intake = Intake()
    intake.put(RequestState("ids", 20, list(range(3, 23)), None))
    intake.put(RequestState("embeds", 16, None, embeds[:16]))
    recompute = RequestState("recompute", 10, None, embeds[16:])  # preempted: 3 outputs to redo
    recompute.output_token_ids = [5, 6, 7]
    intake.put(recompute)
    intake.put(RequestState("two", 2, [9, 4], None))
    # Token ids with embedding rows at positions 2-3 and 7-9 (ids there are placeholders).
    intake.put(RequestState("mixed", 12, list(range(40, 52)), embeds[:5] * 3, ((2, 4), (7, 10))))
    steps = [
        (ScheduledRequest("ids", 0, 12, (1, 2, 3), False),),  # chunk: 4 padding rows, no sample
        (ScheduledRequest("ids", 12, 8, (4, 5), True),),  # continuation: keys from the cache
        (ScheduledRequest("embeds", 0, 16, (6, 7, 8, 9), True),),  # fills bucket 16: no padding
        (ScheduledRequest("recompute", 0, 13, (10, 11, 12, 13), True),),  # embeddings, then ids
        (ScheduledRequest("two", 0, 2, (14,), True),),  # 14 padding rows, wider than a block
        (ScheduledRequest("ids", 20, 1, (6,), True), ScheduledRequest("two", 2, 1, (), True)),
        (ScheduledRequest("mixed", 0, 8, (15, 16), False),),  # one span whole, one begun
        (ScheduledRequest("mixed", 8, 4, (17,), True),),  # the rest of that span, then ids
    ]
    logits = []
    for i, scheduled in enumerate(steps):
        appended = (("ids", 7), ("two", 8)) if i == 5 else ()
        runner.apply(StepPlan(i, appended, (), (), scheduled), intake, 1.0)
        logits.append(runner.execute(scheduled))
    caches = [torch.stack(pair)[:, : runner.num_blocks] for pair in runner.kv_caches]
    return logits, caches, graphs.staging.loads, runner.num_blocks
"""

TP1_SCRIPT = COMMON + """
for path in sys.argv[1:]:
    plain, plain_caches, plain_loads, num_blocks = run(path, padded=False)
    padded, padded_caches, padded_loads, _ = run(path, padded=True)
    # The last step's two decodes run as one-row spans of the prefill graphs too.
    assert plain_loads == 0 and padded_loads == 8, (plain_loads, padded_loads)
    assert plain[0] is None and padded[0] is None  # the first chunks sample nothing
    assert plain[6] is None and padded[6] is None
    for step, (a, b) in enumerate(zip(plain[1:], padded[1:]), 1):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4, msg=f"{path} step {step}")
    for layer, (a, b) in enumerate(zip(plain_caches, padded_caches)):
        # Every block the scheduler can hand out (all but the scratch block) as unpadded.
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5, msg=f"{path} layer {layer} cache")
print("checked")
"""

TP2_SCRIPT = COMMON + ON_TWO_FORKED_RANKS + """
path = sys.argv[1]
reference = run(path, padded=False)[0]
by_rank = on_two_forked_ranks(
    lambda pg: [None if x is None else x.numpy().copy() for x in run(path, padded=True, pg=pg)[0]])
for rank, logits in sorted(by_rank.items()):
    assert [x is None for x in logits] == [x is None for x in reference], rank
    for step, (got, want) in enumerate(zip(logits, reference)):
        if want is not None:
            torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-4, rtol=1e-4,
                                       msg=f"rank {rank} step {step}")
print("checked")
"""


def test_padded_prefill_step_equals_unpadded_in_triton_interpreter(tiny_checkpoints):
    # Mistral for its sliding window, whose masks the padding span must not disturb.
    run_in_triton_interpreter(TP1_SCRIPT, str(tiny_checkpoints("llama")), str(tiny_checkpoints("mistral")))


def test_padded_prefill_steps_at_tp2_equal_tp1_in_triton_interpreter(tiny_checkpoints):
    run_in_triton_interpreter(TP2_SCRIPT, str(tiny_checkpoints("llama")))


def test_buckets_follow_the_step_limit():
    import torch

    from workers.cuda_graphs import PREFILL_BUCKETS, PrefillGraphs

    def buckets(max_tokens):
        return PrefillGraphs(None, [], max_tokens=max_tokens, max_blocks_per_seq=4, block_size=16,
                             scratch_block=3, hidden_size=8, dtype=torch.float32,
                             device=torch.device("cpu")).buckets

    assert buckets(8192) == list(PREFILL_BUCKETS) and PREFILL_BUCKETS[-1] == 2048
    assert buckets(2048)[-4:] == [1280, 1536, 1792, 2048]  # every 256 rows past 512
    assert buckets(1000)[-3:] == [256, 512, 768]
    assert buckets(100) == [16, 32, 64]
    assert buckets(10) == []
    graphs = PrefillGraphs(None, [], max_tokens=64, max_blocks_per_seq=4, block_size=16, scratch_block=3,
                           hidden_size=8, dtype=torch.float32, device=torch.device("cpu"))
    assert [graphs.bucket_for(n) for n in (1, 2, 16, 17, 64, 65)] == [None, 16, 16, 32, 64, None]


def test_the_padding_span_fits_buckets_past_max_model_len():
    """Buckets go to the step's limit (max_num_batched_tokens), past max_model_len: the
    padding span, a whole bucket at capture, must find its keys' blocks in its table row
    (every entry the scratch block), and its rows' positions must stay within the rotary
    table, which may be no longer than max_model_len."""
    import torch

    from workers.cuda_graphs import PrefillGraphs

    block_size, scratch = 16, 9
    graphs = PrefillGraphs(None, [], max_tokens=2048, max_blocks_per_seq=2, block_size=block_size,  # max_model_len 32
                           scratch_block=scratch, hidden_size=8, dtype=torch.float32, device=torch.device("cpu"))
    assert graphs.buckets[-1] == 2048
    for bucket in graphs.buckets:
        graphs._load([], bucket)  # as capture_all() loads each bucket: every row a padding row
        tables = graphs.block_tables
        assert tables.shape[1] * block_size >= bucket
        assert (tables[graphs.max_spans] == scratch).all()
        assert graphs.seq_lens[graphs.max_spans] == bucket
        assert 0 <= int(graphs.positions[:bucket].min()) and int(graphs.positions[:bucket].max()) < block_size
        slots = graphs.slot_mapping[:bucket]
        assert ((slots // block_size) == scratch).all()
