"""scripts/batch_job.py checks every input line before it starts an engine: a bad line
fails the job at once, naming the file and line, with no output written. (The jobs
themselves run through Ray in tests/cluster/test_jobs.py.)"""

from __future__ import annotations

import json

import pytest

from scripts import batch_job

GOOD = {"prompt": "fine", "max_tokens": 2}


class EngineStarted(Exception):
    pass


@pytest.fixture
def engine_starts(monkeypatch):
    """make_llm replaced by a recorder that stops the job where the engine would start."""
    calls = []

    def make_llm(args):
        calls.append(args)
        raise EngineStarted

    monkeypatch.setattr(batch_job, "make_llm", make_llm)
    return calls


def run(tmp_path, lines: list[str], *flags: str) -> tuple[int, str]:
    path = tmp_path / "in.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return batch_job.main(["--input", str(path), "--output", str(tmp_path / "out.jsonl"), *flags]), str(path)


BAD_LINES = {
    "not JSON": ('{"prompt": "cut', "not JSON"),
    "a list": ('["fine"]', "expected a JSON object, got list"),
    "two prompts": (json.dumps({"prompt": "a", "prompt_token_ids": [1]}), "expected exactly one of"),
    "no prompt": (json.dumps({"max_tokens": 3}), "expected exactly one of"),
    "unknown field": (json.dumps({"prompt": "a", "colour": "red"}), "unknown field(s) ['colour']"),
    "n": (json.dumps({"prompt": "a", "n": 2}), "unknown field(s) ['n']"),
    "bad temperature": (json.dumps({"prompt": "a", "temperature": -1}), "temperature"),
    "missing embeddings file": (json.dumps({"prompt_embeds_path": "gone.pt"}), "gone.pt: no such file"),
    "embeddings of another format": (json.dumps({"prompt_embeds_path": "rows.npy"}),
                                     "must end in .safetensors or .pt"),
}


@pytest.mark.parametrize("name", list(BAD_LINES))
def test_a_bad_line_fails_before_the_engine_starts(tmp_path, capsys, engine_starts, name):
    line, expected = BAD_LINES[name]
    code, path = run(tmp_path, [json.dumps(GOOD), "", line, json.dumps(GOOD)])
    assert code == 2 and engine_starts == []
    assert not (tmp_path / "out.jsonl").exists()
    error = capsys.readouterr().err
    assert f"batch_job: error: {path}:3: " in error and expected in error


def test_an_embeddings_file_past_the_limit_fails_before_the_engine_starts(tmp_path, capsys, engine_starts):
    (tmp_path / "rows.pt").write_bytes(b"\0" * 2000)
    code, path = run(tmp_path, [json.dumps({"prompt_embeds_path": "rows.pt"})], "--max-embeds-bytes", "1000")
    assert code == 2 and engine_starts == []
    assert f"{path}:1: " in capsys.readouterr().err


def test_good_lines_reach_the_engine(tmp_path, engine_starts):
    (tmp_path / "rows.pt").write_bytes(b"checked when loaded, by the server's decoder")
    lines = [json.dumps(GOOD), json.dumps({"prompt_token_ids": [1, 2], "seed": 3}),
             json.dumps({"id": "e", "prompt_embeds_path": "rows.pt", "temperature": 0})]
    with pytest.raises(EngineStarted):
        run(tmp_path, lines)
    assert len(engine_starts) == 1
