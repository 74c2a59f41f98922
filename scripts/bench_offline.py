"""Offline generation throughput: shardserve's LLM.generate against Hugging Face
`generate` on the same model and prompts, measured in the same run.

    python scripts/bench_offline.py                                   # CPU, default model
    python scripts/bench_offline.py --model-shape llama-3.1-8b --load-format dummy \
        --dtype bfloat16 --batch-sizes 1 32 --input-len 256 --output-len 256   # GPU

Prints output tokens/s of each side and their ratio per batch size."""

from __future__ import annotations

import argparse
import time

import torch

from cluster import LLM, SamplingParams
from cluster.default_model import model_shape_path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: built-in tiny model)")
    parser.add_argument("--model-shape", default=None, help="a shape from configs/models, e.g. llama-3.1-8b")
    parser.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"])
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--skip-hf", action="store_true", help="engine only (no Hugging Face baseline)")
    return parser.parse_args()


def random_prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab - 10, (batch, length), generator=gen).tolist()


def time_engine(llm: LLM, prompts: list[list[int]], output_len: int) -> float:
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    produced = sum(len(o.outputs[0].token_ids) for o in outputs)
    if produced != len(prompts) * output_len:
        raise RuntimeError(f"engine produced {produced} tokens, expected {len(prompts) * output_len}")
    return elapsed


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
def time_hf(model, prompts: list[list[int]], output_len: int, device: str) -> float:
    input_ids = torch.tensor(prompts, device=device)
    kwargs = dict(max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False, pad_token_id=0)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
    if device == "cuda":
        torch.cuda.synchronize()
    if out.shape[1] - input_ids.shape[1] != output_len:
        raise RuntimeError("Hugging Face generate stopped early")
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    model = str(model_shape_path(args.model_shape)) if args.model_shape else args.model
    llm = LLM(model, tensor_parallel_size=args.tensor_parallel_size, dtype=args.dtype,
              load_format=args.load_format, max_model_len=args.max_model_len)
    config = llm.config
    vocab = config.model_config.vocab_size
    rows = []
    time_engine(llm, random_prompts(2, args.input_len, vocab, 0), 4)  # warm-up
    for batch in args.batch_sizes:
        prompts = random_prompts(batch, args.input_len, vocab, batch)
        engine_s = time_engine(llm, prompts, args.output_len)
        rows.append([batch, batch * args.output_len / engine_s])
    llm.shutdown()
    if not args.skip_hf:
        if config.device == "cpu":
            torch.set_num_threads(args.tensor_parallel_size)  # the same cores the shards use
        hf = load_hf(config.model, config.load_format, config.torch_dtype, config.device)
        time_hf(hf, random_prompts(2, args.input_len, vocab, 0), 4, config.device)  # warm-up
        for row in rows:
            prompts = random_prompts(row[0], args.input_len, vocab, row[0])
            row.append(row[0] * args.output_len / time_hf(hf, prompts, args.output_len, config.device))
    print(f"\nmodel={config.model} tp={config.tensor_parallel_size} dtype={config.dtype} "
          f"device={config.device} input_len={args.input_len} output_len={args.output_len}")
    print(f"{'batch':>6} {'shardserve tok/s':>17} {'HF generate tok/s':>18} {'ratio':>7}")
    for row in rows:
        hf_tps = f"{row[2]:18.1f}" if len(row) > 2 else f"{'-':>18}"
        ratio = f"{row[1] / row[2]:6.2f}x" if len(row) > 2 else f"{'-':>7}"
        print(f"{row[0]:>6} {row[1]:17.1f} {hf_tps} {ratio}")


if __name__ == "__main__":
    main()
