"""Checks a running server end to end: the same prompt sent as token ids and as
`prompt_embeds` (the model's own input embeddings of those ids) gives the same greedy
completion and log-probabilities. Works with any load format, `--load-format dummy`
included: the embedding rows are read from the serving engine's own shards, found by
name on the server's Ray cluster, so nothing needs the checkpoint.

    shardserve serve MODEL --tensor-parallel-size N --enable-prompt-embeds --load-format dummy
    python scripts/check_served_embeds.py --base-url http://127.0.0.1:8000/v1

Run it on a node of the server's Ray cluster (it joins with `--address`, default "auto").
Exits 1 when the two completions differ."""

from __future__ import annotations

import argparse
import base64
import io
import re
import sys

import openai
import ray
import torch

SHARD_NAME = re.compile(r"^shardserve-(?P<engine>.+)-rank(?P<rank>\d+)$")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="EMPTY", help="the server's --api-key, if it has one")
    parser.add_argument("--model", default=None, help="served model name (default: the server's first)")
    parser.add_argument("--address", default="auto", help="Ray address of the server's cluster")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--logprob-atol", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def engine_shards() -> list:
    """The shard actors of one serving engine, in rank order."""
    engines: dict[str, dict[int, tuple[str, str]]] = {}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        match = SHARD_NAME.match(actor["name"])
        if match:
            engines.setdefault(match["engine"], {})[int(match["rank"])] = (actor["name"], actor["namespace"])
    if not engines:
        raise SystemExit("no shardserve engine on this Ray cluster (is the server running here?)")
    name, ranks = sorted(engines.items())[0]
    if sorted(ranks) != list(range(len(ranks))):
        raise SystemExit(f"engine {name} has shards {sorted(ranks)}, not ranks 0..{len(ranks) - 1}")
    return [ray.get_actor(*ranks[r]) for r in range(len(ranks))]


def _local_rows(shard, token_ids: list[int]) -> torch.Tensor:
    """This rank's rows of the vocab-parallel embedding for token_ids (zeros for ids another
    rank holds), float32 on the CPU: a local lookup, no collective."""
    embedding = shard.runner.model.model.embed_tokens
    ids = torch.tensor(token_ids, device=embedding.weight.device)
    is_local = (ids >= embedding.vocab_start) & (ids < embedding.vocab_end)
    rows = embedding.weight[(ids - embedding.vocab_start) * is_local] * is_local[:, None]
    return rows.float().cpu()


def input_embeddings(token_ids: list[int]) -> torch.Tensor:
    """(len, hidden) input embeddings of token_ids, summed over the engine's shards."""
    parts = ray.get([shard.__ray_call__.remote(_local_rows, token_ids) for shard in engine_shards()])
    return torch.stack(parts).sum(0)


def encode_embeds(tensor: torch.Tensor) -> str:
    buffer = io.BytesIO()
    torch.save(tensor.contiguous(), buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not ray.is_initialized():
        ray.init(address=args.address, log_to_driver=False)
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = args.model or client.models.list().data[0].id
    vocab = ray.get(engine_shards()[0].__ray_call__.remote(
        lambda shard: shard.config.model_config.vocab_size))
    gen = torch.Generator().manual_seed(args.seed)
    token_ids = torch.randint(10, vocab - 10, (args.prompt_len,), generator=gen).tolist()
    params = dict(model=model, max_tokens=args.max_tokens, temperature=0.0, logprobs=1)
    by_ids = client.completions.create(prompt=token_ids, **params).choices[0]
    by_embeds = client.completions.create(
        prompt="", extra_body={"prompt_embeds": encode_embeds(input_embeddings(token_ids))}, **params,
    ).choices[0]
    ids_logprobs, embeds_logprobs = by_ids.logprobs.token_logprobs, by_embeds.logprobs.token_logprobs
    max_diff = max(abs(a - b) for a, b in zip(ids_logprobs, embeds_logprobs))
    same = by_ids.text == by_embeds.text and len(ids_logprobs) == len(embeds_logprobs) \
        and max_diff <= args.logprob_atol
    result = {"model": model, "prompt_tokens": len(token_ids), "completion_tokens": len(ids_logprobs),
              "same_text": by_ids.text == by_embeds.text, "max_logprob_diff": max_diff, "ok": same}
    print(" ".join(f"{k}={v}" for k, v in result.items()))
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
