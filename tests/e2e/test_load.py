"""scripts/load_test.py, small, against the session's server (tensor_parallel_size 2, the
default model): 100 concurrent streaming clients a round, half sending prompt_embeds, some
dropping mid-stream; nothing fails, the KV cache is empty after each round and the
server's processes do not grow."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

LOAD_TEST = Path(__file__).resolve().parents[2] / "scripts" / "load_test.py"


def test_small_load_completes_frees_every_block_and_holds_memory(server_url, capsys):
    main = runpy.run_path(str(LOAD_TEST))["main"]
    report = main(["--base-url", f"{server_url}/v1", "--clients", "100", "--rounds", "3",
                   "--max-tokens", "8", "--time-limit-s", "120"])
    assert report["ok"], report["failures"]
    totals = report["totals"]
    assert totals["error"] == 0 and totals["refused"] == 0  # far below the default bounds
    assert totals["completed"] + totals["disconnected"] == 300 and totals["disconnected"] > 0
    assert all(r["kv_cache_usage_after"] == 0 and r["running_after"] == 0 for r in report["rounds"])
    assert report["processes"] >= 3  # two shards and the replica at least: RSS was measured
    assert '"ok": true' in capsys.readouterr().out


def test_load_test_refuses_non_loopback_addresses():
    main = runpy.run_path(str(LOAD_TEST))["main"]
    with pytest.raises(SystemExit, match="loopback"):
        main(["--base-url", "http://10.1.2.3:8000/v1"])
