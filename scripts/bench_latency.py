"""Decode latency against the memory-bandwidth roofline, in the manner of `vllm bench latency`.

    python scripts/bench_latency.py                                          # CPU, default model
    python scripts/bench_latency.py --model-shape llama-3.1-8b --load-format dummy --dtype bfloat16
    python scripts/bench_latency.py --model-shape llama-3.1-70b --load-format dummy \
        --dtype bfloat16 --tensor-parallel-size 2 --compare-embeds
    python scripts/bench_latency.py --model-shape llama-3.1-8b --load-format dummy \
        --dtype bfloat16 -tp 2 --baseline-tp 1 --speedup-goal 1.6   # TP=2 over TP=1, one run

Measures, in one run: the device's copy bandwidth (read + write bytes of a large
device-to-device copy), then the engine's time per decode step at the given batch size,
as (time of a request generating N tokens - time of the same request generating 1) / (N - 1),
medians over interleaved repeats, so prefill and per-request costs cancel out. The roofline
step time is the bytes each shard must read per decode step (its weight slices, the LM head
included, the embedding table not; plus the KV cache of the batch at the mean context
length) over that bandwidth. With --compare-embeds, the same prompts are also sent as
prompt_embeds (random rows of the model's hidden size) and both kinds are reported. With
--baseline-tp, an engine of that tensor-parallel size then runs the same token-id timing,
and the run prints the speed-up of the first over it."""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from cluster import LLM, SamplingParams
from scripts.bench_args import UNCACHED, add_model_args, init_ray, model_path
from workers.config import ModelConfig
from workers.kernels import pdl
from workers.layers import num_local_kv_heads


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--num-iters", type=int, default=5, help="repeats of each timing (median)")
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    parser.add_argument("--no-async-scheduling", action="store_true",
                        help="plan each step after the previous one's samples are read")
    parser.add_argument("--disable-custom-all-reduce", action="store_true",
                        help="tensor-parallel all-reduces through NCCL only")
    parser.add_argument("--compare-embeds", action="store_true",
                        help="also send the prompts as prompt_embeds and compare")
    parser.add_argument("--goal", type=float, default=None, help="goal in %% of roofline, printed beside")
    parser.add_argument("--baseline-tp", type=int, default=None, metavar="N",
                        help="also time token ids on an engine of tensor-parallel size N, after the first "
                             "is shut down, and print the first's speed-up over it")
    parser.add_argument("--speedup-goal", type=float, default=None,
                        help="goal for that speed-up (e.g. 1.6), printed beside")
    args = parser.parse_args(argv)
    if args.speedup_goal is not None and args.baseline_tp is None:
        parser.error("--speedup-goal needs --baseline-tp")
    return args


def copy_bandwidth(device: str, num_bytes: int = 2 << 30, repeats: int = 20) -> float:
    """Bytes per second moved (read + write) by a large same-device copy."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            dst.copy_(src)
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        begin = time.perf_counter()
        for _ in range(repeats):
            dst.copy_(src)
        seconds = time.perf_counter() - begin
    del src, dst
    if device == "cuda":
        torch.cuda.empty_cache()
    return 2 * num_bytes * repeats / seconds


def bytes_per_step(config: ModelConfig, tp: int, element_size: int, batch: int, context: float) -> tuple[float, float]:
    """(weight bytes, KV bytes) one shard reads per decode step: its slices of every
    projection and the LM head (norms and biases are noise), and the batch's K and V."""
    h, d, layers = config.hidden_size, config.head_dim, config.num_hidden_layers
    qkv = (config.num_attention_heads + 2 * config.num_key_value_heads) * d * h
    per_layer = qkv + config.num_attention_heads * d * h + 3 * config.intermediate_size * h
    weights = (layers * per_layer + config.vocab_size * h) * element_size / tp
    kv_heads = num_local_kv_heads(config.num_key_value_heads, tp)
    kv = 2 * layers * kv_heads * d * element_size * context * batch
    return weights, kv


def time_generate(llm: LLM, prompts, max_tokens: int) -> float:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    if any(len(o.outputs[0].token_ids) != max_tokens for o in outputs):
        raise RuntimeError("a request stopped before max_tokens")
    return elapsed


def measure(llm: LLM, prompts, output_len: int, num_iters: int) -> tuple[float, float]:
    """(median seconds per decode step, median seconds of a 1-token request batch)."""
    full, first = [], []
    for _ in range(num_iters):
        first.append(time_generate(llm, prompts, 1))
        full.append(time_generate(llm, prompts, output_len))
    step = (statistics.median(full) - statistics.median(first)) / (output_len - 1)
    return step, statistics.median(first)


def make_prompts(args, config, kind: str):
    gen = torch.Generator().manual_seed(0)
    vocab, hidden = config.model_config.vocab_size, config.model_config.hidden_size
    if kind == "token ids":
        ids = torch.randint(10, vocab - 10, (args.batch_size, args.input_len), generator=gen)
        return [{"prompt_token_ids": row.tolist()} for row in ids]
    rows = torch.randn(args.batch_size, args.input_len, hidden, generator=gen) * 0.02
    return [{"prompt_embeds": r.to(config.torch_dtype)} for r in rows]


def run_engine(args, model, tensor_parallel_size: int, kinds: list[str]):
    """The engine's config and {kind: (seconds per decode step, seconds of a 1-token
    batch)}; the engine is shut down before returning."""
    llm = LLM(model, tensor_parallel_size=tensor_parallel_size, dtype=args.dtype,
              load_format=args.load_format, max_model_len=args.max_model_len,
              max_num_seqs=max(args.batch_size, 1), enforce_eager=args.enforce_eager, **UNCACHED,
              async_scheduling=not args.no_async_scheduling,
              disable_custom_all_reduce=args.disable_custom_all_reduce,
              enable_prompt_embeds="prompt_embeds" in kinds)
    try:
        prompts = {kind: make_prompts(args, llm.config, kind) for kind in kinds}
        for kind in kinds:  # warm-up: graphs captured, allocator settled
            time_generate(llm, prompts[kind], 8)
        return llm.config, {kind: measure(llm, prompts[kind], args.output_len, args.num_iters) for kind in kinds}
    finally:
        llm.shutdown()


def main(argv=None) -> dict:
    args = parse_args(argv)
    init_ray()
    model = model_path(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(args.tensor_parallel_size)  # the cores the shards get
    bandwidth = copy_bandwidth(device)
    kinds = ["token ids"] + (["prompt_embeds"] if args.compare_embeds else [])
    config, results = run_engine(args, model, args.tensor_parallel_size, kinds)
    baseline = None
    if args.baseline_tp is not None:
        baseline = run_engine(args, model, args.baseline_tp, ["token ids"])[1]["token ids"]

    element_size = torch.empty((), dtype=config.torch_dtype).element_size()
    context = args.input_len + args.output_len / 2
    weights, kv = bytes_per_step(config.model_config, config.tensor_parallel_size, element_size,
                                 args.batch_size, context)
    roofline_s = (weights + kv) / bandwidth
    print(f"\nmodel={config.model} tp={config.tensor_parallel_size} dtype={config.dtype} device={config.device} "
          f"batch={args.batch_size} input_len={args.input_len} output_len={args.output_len} "
          f"cuda_graphs={'off' if args.enforce_eager or device == 'cpu' else 'on'} "
          f"async_scheduling={'off' if args.no_async_scheduling else 'on'} "
          f"custom_all_reduce={'off' if args.disable_custom_all_reduce else 'on'} "
          f"pdl={'on' if device == 'cuda' and pdl.launch_options(torch.device('cuda'))['PDL'] else 'off'}")
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s; per shard and step: weights {weights / 1e9:.2f} GB, "
          f"KV {kv / 1e6:.1f} MB (mean context {context:.0f}); roofline {roofline_s * 1e3:.3f} ms/step")
    goal = f" {'goal':>6}" if args.goal else ""
    print(f"{'prompts':>13} {'ms/step':>8} {'tok/s':>9} {'% roofline':>10} {'1-token batch ms':>16}{goal}")
    for kind, (step_s, first_s) in results.items():
        pct = 100 * roofline_s / step_s
        goal = f" {pct / args.goal:5.2f}x" if args.goal else ""
        print(f"{kind:>13} {step_s * 1e3:8.3f} {args.batch_size / step_s:9.1f} {pct:9.1f}% "
              f"{first_s * 1e3:16.2f}{goal}")
    if args.compare_embeds:
        (ids_step, ids_first), (emb_step, emb_first) = results["token ids"], results["prompt_embeds"]
        print(f"prompt_embeds / token ids: time per step {emb_step / ids_step:.3f}x, "
              f"1-token batch time {emb_first / ids_first:.3f}x")
    report = {"roofline_ms": roofline_s * 1e3,
              **{f"{kind} ms/step": step_s * 1e3 for kind, (step_s, _) in results.items()}}
    if baseline is not None:
        speedup = baseline[0] / results["token ids"][0]
        goal = f", goal {args.speedup_goal:g}x: {speedup / args.speedup_goal:.2f}x" if args.speedup_goal else ""
        print(f"TP={args.tensor_parallel_size} over TP={args.baseline_tp} (same run): {speedup:.3f}x tokens/s "
              f"({results['token ids'][0] * 1e3:.3f} against {baseline[0] * 1e3:.3f} ms/step){goal}")
        report.update({"baseline ms/step": baseline[0] * 1e3, "speedup": speedup})
    return report


if __name__ == "__main__":
    main()
