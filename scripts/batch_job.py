"""Offline batch inference over a JSONL file, as a Ray job:
`ray job submit --working-dir . -- python scripts/batch_job.py --input IN --output OUT ...`.
Runs on the job's driver (the head node); the engine's shards are Ray actors on the cluster.

Each input line is an object with one of "prompt" (text), "prompt_token_ids" (list of
ints) or "prompt_embeds_path" (a `.safetensors` or `.pt` file of one (seq_len,
hidden_size) tensor, relative to the input file's folder), an optional "id", and optional
sampling fields (max_tokens, temperature, top_p, top_k, seed, stop, ignore_eos, ...).
Each output line holds id, text, token_ids, finish_reason and num_prompt_tokens, in input
order."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

PROMPT_KEYS = ("prompt", "prompt_token_ids", "prompt_embeds_path")
DEFAULT_MAX_EMBEDS_BYTES = 256 << 20


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="shardserve offline batch inference (JSONL in, JSONL out)")
    parser.add_argument("--input", required=True, type=Path, help="JSONL of prompts")
    parser.add_argument("--output", required=True, type=Path,
                        help="JSONL of results; an absolute path in a Ray job (it runs in a copy of the working dir)")
    parser.add_argument("--model", default=None, help="Hugging Face model folder (default: the built-in tiny model)")
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    parser.add_argument("--enable-prompt-embeds", action="store_true")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"])
    parser.add_argument("--placement-strategy", default="STRICT_PACK",
                        choices=["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"])
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    parser.add_argument("--max-tokens", type=int, default=16, help="default for lines without max_tokens")
    parser.add_argument("--temperature", type=float, default=1.0, help="default for lines without temperature")
    parser.add_argument("--batch-size", type=int, default=256, help="lines per generate call (bounds memory)")
    parser.add_argument("--max-embeds-bytes", type=int, default=DEFAULT_MAX_EMBEDS_BYTES)
    parser.add_argument("--address", default=None, help="Ray cluster to join (default: the job's, or a local one)")
    return parser


def sampling_fields() -> set[str]:
    """SamplingParams fields a line may set; not n: a line gives one result."""
    from cluster import SamplingParams

    return {field.name for field in dataclasses.fields(SamplingParams)} - {"n"}


def load_embeds(path: Path, hidden_size: int, dtype, max_bytes: int):
    """A (seq_len, hidden_size) tensor from a file that check_record passed (its suffix
    and size), never unpickled blindly: safetensors holds no code, and a `.pt` goes
    through the server's checked torch.save decoder."""
    from safetensors.torch import load_file

    from api.embeds_codec import load_prompt_embeds_bytes

    if path.suffix == ".safetensors":
        tensors = load_file(str(path))
        if len(tensors) != 1 and "prompt_embeds" not in tensors:
            raise ValueError(f"{path} holds tensors {sorted(tensors)}; expected one, or one named prompt_embeds")
        return tensors.get("prompt_embeds", next(iter(tensors.values())))
    return load_prompt_embeds_bytes(path.read_bytes(), hidden_size=hidden_size, dtype=dtype, max_bytes=max_bytes)


def check_record(record, base_dir: Path, args, fields: set[str]):
    """An input line's SamplingParams, its structure checked (one prompt key, known fields,
    sampling values, an embeddings file that exists within the size limit) without the
    engine: every line is checked so before the engine starts. ValueError if bad."""
    from cluster import SamplingParams

    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    given = [key for key in PROMPT_KEYS if key in record]
    if len(given) != 1:
        raise ValueError(f"expected exactly one of {list(PROMPT_KEYS)}, got {given}")
    unknown = sorted(set(record) - set(PROMPT_KEYS) - fields - {"id"})
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}; sampling fields are {sorted(fields)}")
    params = SamplingParams(**{"max_tokens": args.max_tokens, "temperature": args.temperature,
                               **{key: record[key] for key in fields & set(record)}})
    if "prompt_embeds_path" in record:
        path = base_dir / str(record["prompt_embeds_path"])
        if path.suffix not in (".safetensors", ".pt"):
            raise ValueError(f"{path}: prompt_embeds_path must end in .safetensors or .pt")
        if not path.is_file():
            raise ValueError(f"{path}: no such file (prompt_embeds_path is relative to the input file's folder)")
        if path.stat().st_size > args.max_embeds_bytes:
            raise ValueError(f"{path} is {path.stat().st_size} bytes; the limit is {args.max_embeds_bytes} "
                             "(--max-embeds-bytes)")
    return params


def parse_line(record, base_dir: Path, llm, args, fields: set[str]):
    """(prompt for LLM.generate, SamplingParams) of one input line; ValueError if bad."""
    params = check_record(record, base_dir, args, fields)
    if "prompt" in record:
        return record["prompt"], params
    if "prompt_token_ids" in record:
        return {"prompt_token_ids": record["prompt_token_ids"]}, params
    config = llm.config
    embeds = load_embeds(base_dir / record["prompt_embeds_path"], config.model_config.hidden_size,
                         config.torch_dtype, args.max_embeds_bytes)
    return {"prompt_embeds": embeds}, params


def check_lines(args, fields: set[str]) -> None:
    """Every line of the input checked (check_record) before the engine starts, so that a
    bad line fails the job at once, naming it, with nothing written."""
    for batch in read_batches(args.input, args.batch_size):
        for number, _, record in batch:
            try:
                check_record(record, args.input.parent, args, fields)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{args.input}:{number}: {exc}") from None


def read_batches(path: Path, batch_size: int):
    """(line number, id, record) lists of at most batch_size non-empty lines."""
    batch = []
    with path.open() as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not JSON: {exc}") from None
            line_id = record.get("id", number) if isinstance(record, dict) else number
            batch.append((number, line_id, record))
            if len(batch) == batch_size:
                yield batch
                batch = []
    if batch:
        yield batch


def run_batch(llm, batch, args, fields, out) -> None:
    prompts, params = [], []
    for number, _, record in batch:
        try:
            prompt, sampling = parse_line(record, args.input.parent, llm, args, fields)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{args.input}:{number}: {exc}") from None
        prompts.append(prompt)
        params.append(sampling)
    for (_, line_id, _), output in zip(batch, llm.generate(prompts, params, use_tqdm=False)):
        choice = output.outputs[0]
        out.write(json.dumps({"id": line_id, "text": choice.text, "token_ids": list(choice.token_ids),
                              "finish_reason": choice.finish_reason,
                              "num_prompt_tokens": output.num_prompt_tokens}) + "\n")


def make_llm(args):
    import ray

    from cluster import LLM

    if args.address:
        ray.init(address=args.address, log_to_driver=False)
    return LLM(args.model, tensor_parallel_size=args.tensor_parallel_size, dtype=args.dtype,
               load_format=args.load_format, max_model_len=args.max_model_len,
               enable_prompt_embeds=args.enable_prompt_embeds, placement_strategy=args.placement_strategy,
               kv_cache_memory_bytes=args.kv_cache_memory_bytes)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    fields, num_lines = sampling_fields(), 0
    try:
        check_lines(args, fields)
        with make_llm(args) as llm, args.output.open("w") as out:
            for batch in read_batches(args.input, args.batch_size):
                run_batch(llm, batch, args, fields, out)
                num_lines += len(batch)
    except ValueError as exc:
        print(f"batch_job: error: {exc}", file=sys.stderr)
        return 2
    print(f"batch_job: wrote {num_lines} results to {args.output}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
