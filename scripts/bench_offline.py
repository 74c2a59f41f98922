"""Offline generation throughput: shardserve's LLM.generate against Hugging Face
`generate` on the same model and prompts, measured in the same run.

    python scripts/bench_offline.py                                   # CPU, default model
    python scripts/bench_offline.py --model-shape llama-3.1-8b --load-format dummy \
        --dtype bfloat16 --batch-sizes 1 32 --input-len 256 --output-len 256   # GPU

    python scripts/bench_offline.py --num-prompts 128 --batch-sizes 32 \
        --input-len-min 8 --input-len 128 --output-len-min 8 --output-len 128   # varied lengths

    python scripts/bench_offline.py --model-shape llama-3.1-8b --load-format dummy --dtype bfloat16 \
        --num-prompts 1000 --input-len 256 --output-len 256 --batch-sizes 256 \
        --max-num-batched-tokens 8192 --hf-batch-sizes 64 128 --hf-num-prompts 128 --compare-embeds

    python scripts/bench_offline.py --model-shape llama-3.1-8b --load-format dummy --dtype bfloat16 \
        --batch-sizes 1 16 --input-len 256 --output-len 32 --compare-embeds --embeds-rows 64 --skip-hf

    python scripts/bench_offline.py ... --compare-embeds --enable-prefix-caching   # the cache's cost

Prints output tokens/s of each side and their ratio per batch size, and the engine's median
time to first token, counted from the generate() call (RequestOutput.metrics): a
throughput run's first tokens wait for the prompts before them, and generate() checks the
prompts and puts their embeddings a step's worth at a time, as it takes them up, so the
call is the one start both kinds of prompt share. Before timing, the engine runs the workload's first `batch` prompts (4
tokens each) of every kind it is timed on, so each kind's step shapes are compiled and
warm; with --compare-embeds, --rounds alternates the two kinds (ids, embeddings, ids, ...)
and keeps each kind's fastest round, so neither pays for going first. Hugging Face's figure is
its best over --hf-batch-sizes (tokens/s, so timing it on the first --hf-num-prompts
prompts keeps its run short). With --num-prompts,
each run is that many prompts of random lengths in [min, max] and random output lengths,
as in offline batch inference: the engine runs them with max_num_seqs = batch size
(continuous batching); Hugging Face runs them in batches of that size, left-padded, each
batch generating up to its longest requested output. Only requested tokens count.
The engine keeps no prefix cache unless --enable-prefix-caching (the engine's default): then
every run's prompts carry a cache_salt of their own, so each run computes its prompts as the
first did while the engine pays what keeping the cache costs (the block hashes: an
embeddings prompt's rows are hashed, 2 MiB in about 0.5 ms on one of the H200 host's cores).
--steps prints rank 0's steps one by one for each batch size and kind: the rows each
computed, the host's and the device's time in it, the period to the next step (the median
over the rounds), to show where one kind's run is longer than the other's."""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch

from cluster import LLM, SamplingParams
from scripts.bench_args import UNCACHED, add_model_args, init_ray, model_path
from scripts.step_events import LeaderSteps, print_steps

_SALTS = itertools.count()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--num-prompts", type=int, default=None,
                        help="varied workload: this many prompts of random lengths per batch size")
    parser.add_argument("--input-len-min", type=int, default=None, help="varied workload: shortest prompt")
    parser.add_argument("--output-len-min", type=int, default=None, help="varied workload: shortest output")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None, help="engine: tokens per step")
    parser.add_argument("--skip-hf", action="store_true", help="engine only (no Hugging Face baseline)")
    parser.add_argument("--hf-batch-sizes", type=int, nargs="+", default=None,
                        help="Hugging Face batch sizes to try (default: the engine's); its best is the baseline")
    parser.add_argument("--hf-num-prompts", type=int, default=None,
                        help="time Hugging Face on the first this many prompts of each workload (tok/s)")
    parser.add_argument("--compare-embeds", action="store_true",
                        help="also run the same workload as prompt_embeds (random rows) and compare")
    parser.add_argument("--embeds-rows", type=int, default=None,
                        help="with --compare-embeds: the embeddings prompts keep their token ids and take this "
                             "many rows of embeddings in their middle instead (a prompt that mixes the two, as a "
                             "chat with a prompt_embeds part is); default: every row")
    parser.add_argument("--enable-prefix-caching", action="store_true",
                        help="keep the engine's prefix cache (its default), each run salted so nothing hits")
    parser.add_argument("--rounds", type=int, default=1,
                        help="timed runs of each kind of prompt, alternating; each kind's fastest is kept (see --keep)")
    parser.add_argument("--steps", action="store_true",
                        help="also print rank 0's steps one by one per batch size and kind (rows, host and "
                             "device ms, period to the next step; median over the rounds)")
    parser.add_argument("--keep", choices=["fastest", "median"], default="fastest",
                        help="which of a kind's rounds its row reports: the fastest, or the median one (by time; "
                             "the lower of the middle two for an even count), whose spread the fastest hides")
    return parser.parse_args()


def make_workload(args, batch: int, vocab: int, seed: int) -> list[tuple[list[int], int]]:
    """(prompt token ids, output length) per request."""
    gen = torch.Generator().manual_seed(seed)
    if args.num_prompts is None:
        ids = torch.randint(10, vocab - 10, (batch, args.input_len), generator=gen).tolist()
        return [(p, args.output_len) for p in ids]

    def lengths(low, high):
        return torch.randint(low, high + 1, (args.num_prompts,), generator=gen).tolist()

    inputs = lengths(args.input_len_min or args.input_len, args.input_len)
    outputs = lengths(args.output_len_min or args.output_len, args.output_len)
    return [(torch.randint(10, vocab - 10, (n,), generator=gen).tolist(), m) for n, m in zip(inputs, outputs)]


def time_engine(llm: LLM, workload, as_embeds: bool = False, embeds_rows: int | None = None,
                leader: LeaderSteps | None = None) -> tuple:
    """(seconds for the whole workload, median ms from the call to a request's first token)
    of one generate() call that takes every prompt at once, as a throughput run does; with
    a leader, a third item: rank 0's steps of the call (CallSteps)."""
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for _, m in workload]
    prompts = [embeds_prompt(llm, p, embeds_rows) if as_embeds else {"prompt_token_ids": p} for p, _ in workload]
    if llm.config.enable_prefix_caching:  # this run's own keys: no block of an earlier run hits
        salt = f"run-{next(_SALTS)}"
        prompts = [{**prompt, "cache_salt": salt} for prompt in prompts]
    called = time.time()  # the clock of RequestMetrics
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    produced = sum(len(o.outputs[0].token_ids) for o in outputs)
    if produced != sum(m for _, m in workload):
        raise RuntimeError(f"engine produced {produced} tokens, expected {sum(m for _, m in workload)}")
    ttft = statistics.median(o.metrics.first_token_time - called for o in outputs) * 1e3
    return (elapsed, ttft) if leader is None else (elapsed, ttft, leader.take(called, called + elapsed))


def time_kinds(llm: LLM, workload, batch: int, kinds: list[bool], rounds: int,
               embeds_rows: int | None = None, keep: str = "fastest",
               leader: LeaderSteps | None = None) -> dict[bool, tuple[float, float]]:
    """{as_embeds: (seconds, median TTFT ms)} of each kind's fastest of `rounds` runs (with
    keep="median", its median run by time), the kinds alternating; a warm-up of the
    workload's first `batch` prompts (4 tokens each) per kind comes first. With a leader,
    prints rank 0's steps one by one, per kind (the median over its rounds)."""
    warmup = [(p, 4) for p, _ in workload[:batch]]
    for as_embeds in kinds:
        time_engine(llm, warmup, as_embeds, embeds_rows)
    runs: dict[bool, list[tuple[float, float]]] = {as_embeds: [] for as_embeds in kinds}
    steps: dict[bool, list] = {as_embeds: [] for as_embeds in kinds}  # with a leader: CallSteps per round
    for _ in range(rounds):
        for as_embeds in kinds:
            result = time_engine(llm, workload, as_embeds, embeds_rows, leader)
            runs[as_embeds].append(result[:2])
            steps[as_embeds] += result[2:]
    if leader is not None:
        print(f"batch {batch}:")
        print_steps({("prompt_embeds" if as_embeds else "token ids"): calls for as_embeds, calls in steps.items()})
    return {as_embeds: kept_round(results, keep) for as_embeds, results in runs.items()}


def kept_round(results: list[tuple[float, float]], keep: str) -> tuple[float, float]:
    """The (seconds, TTFT) of the fastest run, or of the median one by time (the lower of
    the middle two for an even count: a run that happened, not an average)."""
    ordered = sorted(results, key=lambda result: result[0])
    return ordered[0] if keep == "fastest" else ordered[(len(ordered) - 1) // 2]


def embeds_prompt(llm: LLM, token_ids: list[int], embeds_rows: int | None = None) -> dict:
    """Random rows of the model's hidden size, as many as the prompt's tokens (the cost of an
    embeddings prompt does not depend on its values); with embeds_rows, the token ids with
    that many of their middle positions taken by rows (vLLM's prompt_is_token_ids form)."""
    gen = torch.Generator().manual_seed(len(token_ids) * 7919 + token_ids[0])
    rows = torch.randn(len(token_ids), llm.config.model_config.hidden_size, generator=gen) * 0.02
    rows = rows.to(llm.config.torch_dtype)
    if embeds_rows is None:
        return {"prompt_embeds": rows}
    first = (len(token_ids) - embeds_rows) // 2
    is_token = [not first <= position < first + embeds_rows for position in range(len(token_ids))]
    return {"prompt_token_ids": token_ids, "prompt_embeds": rows, "prompt_is_token_ids": is_token}


def load_hf(model_dir: str, load_format: str, dtype: torch.dtype, device: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    if load_format == "dummy":  # random weights of the same shapes, built on the device
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    model.generation_config.eos_token_id = None
    return model.eval()


@torch.inference_mode()
def time_hf(model, workload, batch: int, device: str) -> float:
    """Batches of `batch` requests, left-padded; each generates to its longest output."""
    elapsed = 0.0
    for first in range(0, len(workload), batch):
        chunk = workload[first : first + batch]
        width = max(len(p) for p, _ in chunk)
        input_ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in chunk], device=device)
        new_tokens = max(m for _, m in chunk)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.generate(input_ids, attention_mask=mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        if device == "cuda":
            torch.cuda.synchronize()
        elapsed += time.perf_counter() - start
        if out.shape[1] - width != new_tokens:
            raise RuntimeError("Hugging Face generate stopped early")
    return elapsed


def main() -> None:
    args = parse_args()
    if args.embeds_rows is not None and not (args.compare_embeds and 0 < args.embeds_rows <= args.input_len):
        raise SystemExit("--embeds-rows needs --compare-embeds and a count in 1..--input-len")
    init_ray()
    model = model_path(args)
    max_num_seqs = max(args.batch_sizes) if args.num_prompts else 256
    extra = {"max_num_batched_tokens": args.max_num_batched_tokens} if args.max_num_batched_tokens else {}
    llm = LLM(model, tensor_parallel_size=args.tensor_parallel_size, dtype=args.dtype,
              load_format=args.load_format, max_model_len=args.max_model_len, max_num_seqs=max_num_seqs,
              enable_prompt_embeds=args.compare_embeds, **({} if args.enable_prefix_caching else UNCACHED), **extra)
    config = llm.config
    vocab = config.model_config.vocab_size
    kinds = [False, True] if args.compare_embeds else [False]
    leader = LeaderSteps(llm) if args.steps else None
    rows = []
    for batch in args.batch_sizes:  # the engine captured its CUDA graphs when it started
        workload = make_workload(args, batch, vocab, batch)
        tokens = sum(m for _, m in workload)
        best = time_kinds(llm, workload, batch, kinds, args.rounds, args.embeds_rows, args.keep, leader)
        row = {"batch": batch, "engine": tokens / best[False][0], "ttft": best[False][1]}
        if args.compare_embeds:
            row["embeds"], row["embeds_ttft"] = tokens / best[True][0], best[True][1]
        rows.append(row)
    llm.shutdown()
    if not args.skip_hf:
        warmup = [(p, 4) for p, _ in make_workload(args, 2, vocab, 0)[:2]]
        best_hf = time_hf_best(args, config, vocab, warmup)
        for row in rows:
            row["hf"], row["hf_batch"] = best_hf[row["batch"]]
    print_table(args, config, rows)


def time_hf_best(args, config, vocab: int, warmup) -> dict:
    """{engine batch: (best HF tok/s, its batch)} on the same workloads (or their first
    --hf-num-prompts prompts)."""
    if config.device == "cpu":
        torch.set_num_threads(args.tensor_parallel_size)  # the same cores the shards use
    hf = load_hf(config.model, config.load_format, config.torch_dtype, config.device)
    time_hf(hf, warmup, 2, config.device)
    best = {}
    for batch in args.batch_sizes:
        workload = make_workload(args, batch, vocab, batch)[: args.hf_num_prompts]
        tokens = sum(m for _, m in workload)
        for hf_batch in args.hf_batch_sizes or [batch]:
            tps = tokens / time_hf(hf, workload, hf_batch, config.device)
            if batch not in best or tps > best[batch][0]:
                best[batch] = (tps, hf_batch)
    return best


def print_table(args, config, rows) -> None:
    shape = (f"num_prompts={args.num_prompts} input_len={args.input_len_min or args.input_len}-{args.input_len} "
             f"output_len={args.output_len_min or args.output_len}-{args.output_len}" if args.num_prompts
             else f"input_len={args.input_len} output_len={args.output_len}")
    print(f"\nmodel={config.model} tp={config.tensor_parallel_size} dtype={config.dtype} "
          f"device={config.device} {shape} rounds={args.rounds}" + (" (median kept)" if args.keep == "median" else "")
          + (f" embeds: {args.embeds_rows} rows among token ids" if args.compare_embeds and args.embeds_rows else "")
          + (" prefix-caching=on (salted runs)" if config.enable_prefix_caching else ""))
    embeds = (f" {'embeds tok/s':>13} {'embeds/ids':>10} {'embeds TTFT ms':>14} {'TTFT embeds/ids':>15}"
              if args.compare_embeds else "")
    print(f"{'batch':>6} {'shardserve tok/s':>17} {'TTFT ms':>9} {'HF generate tok/s':>18} {'HF batch':>8} "
          f"{'ratio':>7}{embeds}")
    for row in rows:
        hf = row.get("hf")
        hf_cols = f"{hf:18.1f} {row['hf_batch']:>8} {row['engine'] / hf:6.2f}x" if hf else f"{'-':>18} {'-':>8} {'-':>7}"
        embeds = (f" {row['embeds']:13.1f} {row['embeds'] / row['engine']:9.3f}x {row['embeds_ttft']:14.1f} "
                  f"{row['embeds_ttft'] / row['ttft']:14.3f}x" if args.compare_embeds else "")
        print(f"{row['batch']:>6} {row['engine']:17.1f} {row['ttft']:9.1f} {hf_cols}{embeds}")
    print("(TTFT: median over the run's requests, all submitted in one generate() call, from that call "
          f"to the request's first token; each kind's {'median' if args.keep == 'median' else 'fastest'} round)")


if __name__ == "__main__":
    main()
