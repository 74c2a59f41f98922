"""Where an offline run's time goes, step by step: the real leader step loop in this
process (one shard, no Ray) runs N random prompts, with CUDA events around every launched
step. Prints, per kind of step (decode by batch bucket, mixed by tokens), the count, the
GPU time from launch to the sampler's last kernel, the step's span on the GPU timeline
(end to end) and the host time spent launching it. A step whose timeline span exceeds its
GPU time left the GPU idle.

    python scripts/profile_step_loop.py --model-shape llama-3.1-8b --load-format dummy --dtype bfloat16 \\
        --num-prompts 1000 --input-len 256 --output-len 256 --max-num-batched-tokens 8192

With `--max-num-seqs 8 --output-len-spread 0.5`, requests end one by one and each new one
joins running decodes: the mixed steps of a server under steady load.

On a machine without CUDA it runs the built-in default model on the CPU, with host clocks
for the events."""

from __future__ import annotations

import argparse
import gc
import random
import threading
import time
from collections import defaultdict

import torch

from cluster.engine_args import EngineArgs
from scripts.bench_args import add_model_args, model_path
from scripts.step_events import new_event
from workers.config import EngineConfig
from workers.intake import Intake, RequestState
from workers.messages import NewRequest
from workers.model_runner import ModelRunner
from workers.parallel import ProcessGroup
from workers.request import Request
from workers.sampling_params import SamplingParams
from workers.step_loop import LeaderLoop


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser)
    parser.add_argument("--num-prompts", type=int, default=1000)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--output-len-spread", type=float, default=0.0, metavar="F",
                        help="each prompt's max_tokens drawn from output-len * [1 - F, 1 + F], so that requests "
                             "end and new ones join at different steps (mixed steps of few prefills)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--op-table", type=int, default=0, metavar="N",
                        help="also print torch.profiler's N costliest ops of the run, by host and by device time")
    parser.add_argument("--sync-debug", action="store_true",
                        help="warn at every host-device synchronization of the run (CUDA)")
    return parser.parse_args(argv)


class ProfiledLoop:
    """A LeaderLoop on its own thread whose launches are timed."""

    def __init__(self, config: EngineConfig, runner: ModelRunner):
        self.config, self.runner, self.intake = config, runner, Intake()
        self.loop = LeaderLoop(config, runner, ProcessGroup(), self.intake)
        self.cuda = runner.device.type == "cuda"
        self.records = []  # (is_decode, requests, tokens, start event, end event, host seconds)
        launch = self.loop._launch

        def timed_launch(out, feedback=None):
            start, end = self._event(), self._event()
            host_start = time.perf_counter()
            start.record()
            launched = launch(out, feedback)
            end.record()
            self.records.append((out.num_scheduled_tokens == len(out.scheduled), len(out.scheduled),
                                 out.num_scheduled_tokens, start, end, time.perf_counter() - host_start))
            return launched

        self.loop._launch = timed_launch
        self.thread = threading.Thread(target=self.loop.run, daemon=True)
        self.thread.start()

    def _event(self):
        return new_event(self.cuda)

    def run(self, prompts: list[list[int]], output_lens: list[int], tag: str) -> float:
        """Wall seconds until every prompt has finished."""
        self.records.clear()
        start = time.perf_counter()
        for i, (prompt, output_len) in enumerate(zip(prompts, output_lens)):
            params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
            new = NewRequest(f"{tag}{i}", tuple(prompt), None, params)
            self.intake.put(RequestState(new.req_id, len(prompt), list(prompt), None))
            self.loop.add_requests([Request.from_new_request(new, self.config.eos_token_ids,
                                                             self.config.max_model_len, device=self.runner.device)])
        finished = 0
        while finished < len(prompts):
            finished += sum(d.finish_reason is not None for d in self.loop.outbox.take(1.0))
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def stop(self) -> None:
        self.loop.stop()
        self.thread.join()


def summarize(records, buckets) -> dict:
    """Per (kind, bucket): steps, mean GPU ms, mean timeline ms, mean host ms."""
    rows = defaultdict(lambda: [0, 0.0, 0.0, 0.0])
    previous_end = None
    for is_decode, requests, tokens, start, end, host_s in records:
        # Mixed steps by tokens: up to 128, 512 and 2048, then per 2048.
        size = next((b for b in (128, 512, 2048) if tokens <= b), -(-tokens // 2048) * 2048)
        key = ("decode", buckets(requests)) if is_decode else ("mixed", size)
        row = rows[key]
        row[0] += 1
        row[1] += start.elapsed_time(end)
        row[2] += previous_end.elapsed_time(end) if previous_end is not None else 0.0
        row[3] += host_s * 1e3
        previous_end = end
    return {key: (n, gpu / n, timeline / n, host / n) for key, (n, gpu, timeline, host) in sorted(rows.items())}


def engine_config(args: argparse.Namespace, cuda: bool) -> EngineConfig:
    """The engine's settings as LLM(...) resolves them (--dtype auto: the checkpoint's
    dtype); float32 on CPU."""
    config, _ = EngineArgs(
        model=model_path(args), dtype=args.dtype if cuda else "float32", load_format=args.load_format,
        device="cuda" if cuda else "cpu", max_model_len=args.max_model_len,
        max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
    ).resolve()
    return config


def main(argv=None) -> dict:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    config = engine_config(args, cuda)
    if cuda:
        torch.cuda.set_device(0)
    runner = ModelRunner(config, ProcessGroup(), torch.device("cuda", 0) if cuda else torch.device("cpu"))
    profiled = ProfiledLoop(config, runner)
    rng = random.Random(0)
    vocab = config.model_config.vocab_size
    try:
        profiled.run([[rng.randrange(10, vocab - 10) for _ in range(8)]] * 2, [4, 4], "warmup-")
        prompts = [[rng.randrange(10, vocab - 10) for _ in range(args.input_len)] for _ in range(args.num_prompts)]
        spread = args.output_len * args.output_len_spread
        output_lens = [max(1, round(args.output_len + rng.uniform(-spread, spread))) for _ in prompts]
        if args.sync_debug and cuda:
            torch.cuda.set_sync_debug_mode("warn")
        if args.op_table:
            # The loop runs on its own thread, which a default profiler does not see.
            all_threads = torch._C._profiler._ExperimentalConfig(profile_all_threads=True)
            with torch.profiler.profile(experimental_config=all_threads) as prof:
                wall = profiled.run(prompts, output_lens, "p")
        else:
            wall = profiled.run(prompts, output_lens, "p")
        if args.sync_debug and cuda:
            torch.cuda.set_sync_debug_mode(0)
    finally:
        profiled.stop()
    graphs = runner.decode_graphs
    rows = summarize(profiled.records, graphs.bucket_for if graphs is not None else (lambda n: n))
    num_steps = len(profiled.records)
    # The GPU's memory back (the loop and its timed launch refer to each other): a second
    # main() in this process measures free memory for its cache, as a fresh process would.
    del profiled, runner, graphs
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    tokens = sum(output_lens)
    print(f"{args.num_prompts} x {args.input_len} -> {args.output_len}: {wall:.2f} s, {tokens / wall:.0f} "
          f"output tok/s, {num_steps} steps")
    print(f"{'kind':>8} {'bucket':>6} {'steps':>6} {'gpu ms':>8} {'timeline ms':>12} {'host ms':>8} {'total s':>8}")
    for (kind, bucket), (n, gpu, timeline, host) in rows.items():
        print(f"{kind:>8} {bucket:>6} {n:>6} {gpu:>8.2f} {timeline:>12.2f} {host:>8.2f} {n * timeline / 1e3:>8.2f}")
    if args.op_table:
        ops = prof.key_averages()
        print(ops.table(sort_by="self_cpu_time_total", row_limit=args.op_table))
        if cuda:
            print(ops.table(sort_by="self_device_time_total", row_limit=args.op_table))
    return {"wall_s": wall, "rows": rows}


if __name__ == "__main__":
    main()
