"""Time to the first token of one prompt through the offline engine (Ray included, no
HTTP): the median of `LLM.generate(max_tokens=1)` over repeats, for the prompt as token ids
and as `prompt_embeds` (random rows of the model's hidden size), interleaved so neither
always follows the other. Also the driver's own share of an embeddings request: the one
`ray.put` of its array.

    python scripts/probe_first_token.py -tp 2 --repeats 40
    SHARDSERVE_USE_SHM_PLANS=0 python scripts/probe_first_token.py -tp 2   # plans over gloo

Without --model-shape / --model it runs the built-in default model (CPU works)."""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from cluster import LLM, SamplingParams
from scripts.bench_args import add_model_args, model_path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--max-model-len", type=int, default=1024)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    llm = LLM(model_path(args), tensor_parallel_size=args.tensor_parallel_size, load_format=args.load_format,
              dtype=args.dtype, max_model_len=args.max_model_len, enable_prompt_embeds=True)
    try:
        hidden = llm.config.model_config.hidden_size
        prompts = {"token ids": {"prompt_token_ids": list(range(10, 10 + args.prompt_len))},
                   "prompt_embeds": {"prompt_embeds": torch.randn(args.prompt_len, hidden,
                                                                  generator=torch.Generator().manual_seed(0))}}
        one_token = SamplingParams(temperature=0.0, max_tokens=1)
        for prompt in prompts.values():  # warm-up
            llm.generate([prompt, prompt], one_token, use_tqdm=False)
        times = {mode: [] for mode in prompts}
        for i in range(args.repeats):
            for mode in (list(prompts) if i % 2 else list(reversed(prompts))):
                start = time.perf_counter()
                llm.generate([prompts[mode]], one_token, use_tqdm=False)
                times[mode].append((time.perf_counter() - start) * 1e3)
        puts = []
        for _ in range(args.repeats):
            parsed = llm._parse(prompts["prompt_embeds"])
            start = time.perf_counter()
            llm.engine.put_prompt(parsed)
            puts.append((time.perf_counter() - start) * 1e3)
    finally:
        llm.shutdown()
    result = {f"median {mode} (ms)": statistics.median(values) for mode, values in times.items()}
    result["ratio"] = result["median prompt_embeds (ms)"] / result["median token ids (ms)"]
    result["median ray.put of the embeddings (ms)"] = statistics.median(puts)
    print(f"TP={args.tensor_parallel_size}, {args.prompt_len}-row prompt, {args.repeats} repeats: "
          + ", ".join(f"{key} {value:.3f}" for key, value in result.items()))
    return result


if __name__ == "__main__":
    main()
