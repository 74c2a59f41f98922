"""Prefix caching, measured: prompts that share one long prefix (a system prompt, a
retrieved document, a soft prompt) and end in a short suffix of their own, run by an engine
with the prefix cache and by one without it, in the same run. Prints each engine's output
throughput and median time to first token, the ratios, and the share of prompt tokens read
from the cache. Before the timed call each engine has run the prefix once (the system prompt
seen before), untimed.

    python scripts/bench_prefix_caching.py --num-prompts 200 --prefix-len 512 --suffix-len 32
    python scripts/bench_prefix_caching.py --model-shape llama-3.1-8b --load-format dummy \\
        --dtype bfloat16 --num-prompts 500 --prefix-len 1024 --suffix-len 64 --prompt-embeds

With --prompt-embeds the prompts are embedding rows (the shared prefix's rows equal in
every prompt) instead of token ids."""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from cluster import LLM, SamplingParams
from scripts.bench_args import add_model_args, init_ray, model_path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser)
    parser.add_argument("--num-prompts", type=int, default=200)
    parser.add_argument("--prefix-len", type=int, default=512, help="tokens (or rows) every prompt starts with")
    parser.add_argument("--suffix-len", type=int, default=32, help="tokens (or rows) of each prompt's own")
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--prompt-embeds", action="store_true", help="prompts as embedding rows")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def make_prompts(args, vocab: int, hidden: int, dtype: torch.dtype) -> tuple[dict, list[dict]]:
    """(the prefix alone, the timed prompts: the prefix then a random suffix each)."""
    gen = torch.Generator().manual_seed(args.seed)
    if args.prompt_embeds:
        def rows(n: int) -> torch.Tensor:
            return (torch.randn(n, hidden, generator=gen) * 0.02).to(dtype)
        prefix = rows(args.prefix_len)
        return ({"prompt_embeds": prefix},
                [{"prompt_embeds": torch.cat([prefix, rows(args.suffix_len)])} for _ in range(args.num_prompts)])
    prefix = torch.randint(5, vocab, (args.prefix_len,), generator=gen).tolist()
    return ({"prompt_token_ids": prefix},
            [{"prompt_token_ids": prefix + torch.randint(5, vocab, (args.suffix_len,), generator=gen).tolist()}
             for _ in range(args.num_prompts)])


def run_engine(args, enable_prefix_caching: bool) -> dict:
    """One engine: a warm-up of other prompts, the prefix alone, then the timed call."""
    with LLM(model_path(args), tensor_parallel_size=args.tensor_parallel_size, dtype=args.dtype,
             load_format=args.load_format, max_model_len=args.max_model_len,
             enable_prompt_embeds=args.prompt_embeds, enable_prefix_caching=enable_prefix_caching) as llm:
        config = llm.config
        prefix, prompts = make_prompts(args, config.model_config.vocab_size, config.model_config.hidden_size,
                                       config.torch_dtype)
        params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
        warmup_args = argparse.Namespace(**{**vars(args), "seed": args.seed + 1, "num_prompts": 8})
        llm.generate(make_prompts(warmup_args, config.model_config.vocab_size, config.model_config.hidden_size,
                                  config.torch_dtype)[1], params, use_tqdm=False)
        llm.generate([prefix], SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
        before = llm.engine.stats()
        called = time.time()  # the clock of RequestMetrics
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        after = llm.engine.stats()
    produced = sum(len(o.outputs[0].token_ids) for o in outputs)
    queries = after.prefix_cache_queries - before.prefix_cache_queries
    return {
        "output tok/s": produced / elapsed,
        "median TTFT (ms)": statistics.median(o.metrics.first_token_time - called for o in outputs) * 1e3,
        "prompt tokens from the cache": (after.prefix_cache_hits - before.prefix_cache_hits) / queries if queries else 0.0,
        "seconds": elapsed,
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    init_ray()
    results = {"cache off": run_engine(args, False), "cache on": run_engine(args, True)}
    kind = "embedding rows" if args.prompt_embeds else "token ids"
    print(f"\nmodel={model_path(args) or 'default'} tp={args.tensor_parallel_size} prompts={args.num_prompts} "
          f"({kind}: {args.prefix_len} shared + {args.suffix_len} own) output_len={args.output_len}")
    print(f"{'':>30} {'cache off':>12} {'cache on':>12} {'on / off':>10}")
    for metric in ("output tok/s", "median TTFT (ms)", "prompt tokens from the cache"):
        off, on = results["cache off"][metric], results["cache on"][metric]
        ratio = f"{on / off:>9.3f}x" if off else f"{'-':>10}"
        print(f"{metric:>30} {off:>12.3f} {on:>12.3f} {ratio}")
    return results


if __name__ == "__main__":
    main()
