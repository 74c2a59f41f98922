"""Offline generation throughput: shardserve's LLM.generate against Hugging Face
`generate` on the same model and prompts, measured in the same run.

    python scripts/bench_offline.py                                   # CPU, default model
    python scripts/bench_offline.py --model-shape llama-3.1-8b --load-format dummy \
        --dtype bfloat16 --batch-sizes 1 32 --input-len 256 --output-len 256   # GPU

    python scripts/bench_offline.py --num-prompts 128 --batch-sizes 32 \
        --input-len-min 8 --input-len 128 --output-len-min 8 --output-len 128   # varied lengths

Prints output tokens/s of each side and their ratio per batch size. With --num-prompts,
each run is that many prompts of random lengths in [min, max] and random output lengths,
as in offline batch inference: the engine runs them with max_num_seqs = batch size
(continuous batching); Hugging Face runs them in batches of that size, left-padded, each
batch generating up to its longest requested output. Only requested tokens count."""

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
    parser.add_argument("--num-prompts", type=int, default=None,
                        help="varied workload: this many prompts of random lengths per batch size")
    parser.add_argument("--input-len-min", type=int, default=None, help="varied workload: shortest prompt")
    parser.add_argument("--output-len-min", type=int, default=None, help="varied workload: shortest output")
    parser.add_argument("--skip-hf", action="store_true", help="engine only (no Hugging Face baseline)")
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


def time_engine(llm: LLM, workload) -> float:
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for _, m in workload]
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p, _ in workload], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    produced = sum(len(o.outputs[0].token_ids) for o in outputs)
    if produced != sum(m for _, m in workload):
        raise RuntimeError(f"engine produced {produced} tokens, expected {sum(m for _, m in workload)}")
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
    model = str(model_shape_path(args.model_shape)) if args.model_shape else args.model
    max_num_seqs = max(args.batch_sizes) if args.num_prompts else 256
    llm = LLM(model, tensor_parallel_size=args.tensor_parallel_size, dtype=args.dtype,
              load_format=args.load_format, max_model_len=args.max_model_len, max_num_seqs=max_num_seqs)
    config = llm.config
    vocab = config.model_config.vocab_size
    warmup = [(p, 4) for p, _ in make_workload(args, 2, vocab, 0)[:2]]
    time_engine(llm, warmup)
    rows = []
    for batch in args.batch_sizes:
        workload = make_workload(args, batch, vocab, batch)
        rows.append([batch, sum(m for _, m in workload) / time_engine(llm, workload)])
    llm.shutdown()
    if not args.skip_hf:
        if config.device == "cpu":
            torch.set_num_threads(args.tensor_parallel_size)  # the same cores the shards use
        hf = load_hf(config.model, config.load_format, config.torch_dtype, config.device)
        time_hf(hf, warmup, 2, config.device)
        for row in rows:
            workload = make_workload(args, row[0], vocab, row[0])
            row.append(sum(m for _, m in workload) / time_hf(hf, workload, row[0], config.device))
    shape = (f"num_prompts={args.num_prompts} input_len={args.input_len_min}-{args.input_len} "
             f"output_len={args.output_len_min}-{args.output_len}" if args.num_prompts
             else f"input_len={args.input_len} output_len={args.output_len}")
    print(f"\nmodel={config.model} tp={config.tensor_parallel_size} dtype={config.dtype} "
          f"device={config.device} {shape}")
    print(f"{'batch':>6} {'shardserve tok/s':>17} {'HF generate tok/s':>18} {'ratio':>7}")
    for row in rows:
        hf_tps = f"{row[2]:18.1f}" if len(row) > 2 else f"{'-':>18}"
        ratio = f"{row[1] / row[2]:6.2f}x" if len(row) > 2 else f"{'-':>7}"
        print(f"{row[0]:>6} {row[1]:17.1f} {hf_tps} {ratio}")


if __name__ == "__main__":
    main()
