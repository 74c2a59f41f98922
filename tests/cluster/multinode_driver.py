"""A Ray driver for the multi-node tests, run as its own process (`python -m
tests.cluster.multinode_driver ADDRESS DASHBOARD_URL`) because the pytest process already drives the
session's local Ray. Prints one JSON line: greedy tokens and shard nodes per placement."""

from __future__ import annotations

import json
import sys

import ray
import torch
from ray.util.state import list_actors

from cluster import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
ENGINE = {"tensor_parallel_size": 2, "enable_prompt_embeds": True, "max_model_len": 256,
          "kv_cache_memory_bytes": 16 << 20}


def prompts(hidden_size: int) -> list:
    """Text, token ids and embeddings: the embeddings are put on the driver's node and
    must reach the shard on the other node too."""
    embeds = torch.randn(5, hidden_size, generator=torch.Generator().manual_seed(0))
    return ["Ray places one shard on each node", {"prompt_token_ids": [11, 12, 13, 14]},
            {"prompt_embeds": embeds}]


def shard_nodes(llm: LLM, dashboard_url: str) -> list[str]:
    """Node ids of the engine's live ShardWorker actors, found by its placement group.
    The state API gets the dashboard's address: other Ray clusters may run on this host."""
    group_id = llm.engine.placement_group.id.hex()
    actors = list_actors(address=dashboard_url,
                         filters=[("placement_group_id", "=", group_id), ("state", "=", "ALIVE")])
    assert {actor.class_name for actor in actors} == {"ShardWorker"}, actors
    return sorted(actor.node_id for actor in actors)


def run_engine(strategy: str, dashboard_url: str) -> dict:
    with LLM(placement_strategy=strategy, **ENGINE) as llm:
        outputs = llm.generate(prompts(llm.config.model_config.hidden_size), GREEDY, use_tqdm=False)
        nodes = shard_nodes(llm, dashboard_url)
    return {"nodes": nodes, "token_ids": [out.outputs[0].token_ids for out in outputs]}


def node_names() -> dict[str, str]:
    """node id -> the custom resource that names the node (node_a, node_b)."""
    return {node["NodeID"]: next(name for name in node["Resources"] if name.startswith("node_"))
            for node in ray.nodes() if node["Alive"]}


def main(address: str, dashboard_url: str) -> None:
    ray.init(address=address, log_to_driver=False)
    result = {"names": node_names(), "pack": run_engine("STRICT_PACK", dashboard_url),
              "spread": run_engine("STRICT_SPREAD", dashboard_url)}
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
