"""`shardserve serve` as users run it (a subprocess with its own local Ray, tensor_parallel_size
2): SIGTERM lets an in-flight streamed request finish, however many signals follow it, then
the CLI exits 0, without Ray's warnings, and every process it started (Ray's, the
replica's, the shards') is gone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx

from scripts.load_test import descendants
from tests.cluster.test_engine_faults import is_process_gone, wait_until
from tests.e2e.conftest import free_port, stream_events, wait_healthy

START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 90.0


def test_sigterm_drains_in_flight_requests_then_stops_everything(tmp_path):
    port = free_port()
    command = [sys.executable, "-m", "api.cli", "serve", "--port", str(port), "--tensor-parallel-size", "2",
               "--max-model-len", "512", "--kv-cache-memory-bytes", str(16 << 20), "--device", "cpu"]
    log = open(tmp_path / "serve.log", "w+")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "RAY_ADDRESS": ""})
    try:
        wait_healthy(f"http://127.0.0.1:{port}", START_TIMEOUT_S)
        started = descendants(server.pid)
        body = {"prompt": "The quick brown fox", "max_tokens": 150, "ignore_eos": True, "stream": True}

        def signals():  # mid-stream: SIGTERM, then more as supervisors and wrappers send
            for sig in [signal.SIGTERM] + [signal.SIGINT, signal.SIGTERM] * 10:
                server.send_signal(sig)
                time.sleep(0.001)  # spaced, so some land while an earlier one is handled

        events = stream_events(f"http://127.0.0.1:{port}", body, signals)
        assert server.wait(STOP_TIMEOUT_S) == 0
    finally:
        if server.poll() is None:
            server.kill()
        log.seek(0)
        output = log.read()
    assert events[-1] == "[DONE]", output[-3000:]
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length", output[-3000:]
    assert "shutting down" in output
    # The local Ray goes whole: no serve.shutdown() killing the controller under its own call.
    assert "graceful_shutdown failed" not in output, output[-3000:]
    assert len(started) >= 4  # Ray's own processes, the replica and two shards at least
    assert wait_until(lambda: all(is_process_gone(pid) for pid in started), 30), \
        [pid for pid in started if not is_process_gone(pid)]


def test_a_bad_engine_setting_stops_the_cli_before_serving():
    """A context past the built-in model's 2048 positions: exit 2 with the reason, not a
    failed Serve deployment after its replicas tried; with the device named, before a
    local Ray starts."""
    command = [sys.executable, "-m", "api.cli", "serve", "--port", str(free_port()), "--max-model-len", "4096",
               "--device", "cpu"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=START_TIMEOUT_S,
                          env={**os.environ, "RAY_ADDRESS": ""})
    assert done.returncode == 2, done.stderr[-2000:]
    assert ("shardserve: error: max_model_len (4096) is greater than the model's max_position_embeddings (2048)"
            in done.stderr)
    assert "serving" not in done.stdout
    assert "Started a local Ray instance" not in done.stderr


def test_shards_a_local_ray_cannot_hold_stop_the_cli_before_serving():
    """A local Ray cannot grow: shards it could never place (here one node, asked to put
    two shards on a node each) are exit 2 with the reason, not a Serve deployment that
    waits for them without end; on CPU, before that Ray starts."""
    command = [sys.executable, "-m", "api.cli", "serve", "--port", str(free_port()), "--device", "cpu",
               "--tensor-parallel-size", "2", "--placement-strategy", "STRICT_SPREAD"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=START_TIMEOUT_S,
                          env={**os.environ, "RAY_ADDRESS": ""})
    assert done.returncode == 2, done.stderr[-2000:]
    assert ("shardserve: error: cannot place tensor_parallel_size=2 x num_replicas=1 on this machine: 1 node(s) "
            "of this Ray cluster can hold a bundle of {'CPU': 1.0}, and STRICT_SPREAD puts 2 bundles" in done.stderr), done.stderr[-2000:]
    assert "serving" not in done.stdout
    assert "Started a local Ray instance" not in done.stderr
