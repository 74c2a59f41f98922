"""scripts/batch_job.py submitted as a Ray job to the two-node cluster through
JobSubmissionClient: text, token-id and embedding-file lines (.safetensors and .pt) in,
results in input order out; a bad embeddings file fails the job with the line named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ray.job_submission import JobStatus
from safetensors.torch import load_file, save_file

from cluster.default_model import default_model_path
from tests.cluster.local_cluster import wait_until

REPO = Path(__file__).resolve().parents[2]
JOB_TIMEOUT_S = 180
TOKEN_IDS = [31, 415, 1002, 77, 5]
ENGINE_FLAGS = ("--tensor-parallel-size 2 --enable-prompt-embeds --max-model-len 256 "
                "--kv-cache-memory-bytes 16777216 --max-tokens 6 --temperature 0")


def submit(cluster, input_path: Path, output_path: Path) -> tuple[JobStatus, str]:
    """`ray job submit --working-dir . -- python scripts/batch_job.py ...`; (status, logs)."""
    client = cluster.job_client()
    job_id = client.submit_job(
        entrypoint=f"python scripts/batch_job.py --input {input_path} --output {output_path} {ENGINE_FLAGS}",
        runtime_env={"working_dir": str(REPO)})
    wait_until(lambda: client.get_job_status(job_id).is_terminal(), JOB_TIMEOUT_S, f"job {job_id}")
    return client.get_job_status(job_id), client.get_job_logs(job_id)


@pytest.fixture(scope="module")
def embeds() -> torch.Tensor:
    """The default model's input embeddings of TOKEN_IDS: (5, hidden_size)."""
    table = load_file(default_model_path() / "model.safetensors")["model.embed_tokens.weight"]
    return table[TOKEN_IDS].clone()


def write_inputs(folder: Path, embeds: torch.Tensor) -> Path:
    save_file({"prompt_embeds": embeds}, folder / "embeds.safetensors")
    torch.save(embeds, folder / "embeds.pt")
    lines = [
        {"id": "text", "prompt": "Ray jobs run batches", "ignore_eos": True},
        {"id": "ids", "prompt_token_ids": TOKEN_IDS, "ignore_eos": True},
        {"id": "st", "prompt_embeds_path": "embeds.safetensors", "ignore_eos": True},
        {"prompt_embeds_path": "embeds.pt", "ignore_eos": True, "max_tokens": 3},
        *({"id": name, "prompt": "seeded", "temperature": 1.0, "seed": seed, "ignore_eos": True}
          for name, seed in (("seed7", 7), ("seed7-again", 7), ("seed8", 8))),
    ]
    path = folder / "prompts.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_batch_job_writes_results_in_input_order(multinode_cluster, embeds, tmp_path):
    output_path = tmp_path / "results.jsonl"
    status, logs = submit(multinode_cluster, write_inputs(tmp_path, embeds), output_path)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    assert f"wrote 7 results to {output_path}" in logs
    results = [json.loads(line) for line in output_path.read_text().splitlines()]
    assert [r["id"] for r in results] == ["text", "ids", "st", 4, "seed7", "seed7-again", "seed8"]
    by_id = {r["id"]: r for r in results}
    assert [len(r["token_ids"]) for r in results] == [6, 6, 6, 3, 6, 6, 6]
    assert all(r["finish_reason"] == "length" for r in results)
    assert [by_id[k]["num_prompt_tokens"] for k in ("ids", "st", 4)] == [5, 5, 5]
    # Embeddings of the token ids continue exactly like the ids, from either file format.
    assert by_id["st"]["token_ids"] == by_id["ids"]["token_ids"]
    assert by_id[4]["token_ids"] == by_id["ids"]["token_ids"][:3]
    # A line's own sampling fields apply: seeded sampling, not the greedy default.
    assert by_id["seed7"]["token_ids"] == by_id["seed7-again"]["token_ids"] != by_id["seed8"]["token_ids"]
    assert by_id["text"]["text"]


def test_batch_job_refuses_an_unsafe_pt_file_naming_the_line(multinode_cluster, tmp_path):
    torch.save({"not": "a tensor"}, tmp_path / "bad.pt")
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "fine"}) + "\n" + json.dumps({"prompt_embeds_path": "bad.pt"}) + "\n")
    status, logs = submit(multinode_cluster, path, tmp_path / "out.jsonl")
    assert status == JobStatus.FAILED
    assert f"batch_job: error: {path}:2: prompt_embeds must be a torch.save of one dense" in logs
