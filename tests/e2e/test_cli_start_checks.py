"""`shardserve serve` as users run it (a subprocess, no Ray address): settings that could
never serve stop the CLI with exit 2 and the reason before it serves, and before a local
Ray starts. (SIGTERM's drain and clean stop: test_haproxy_ingress.py and
test_reliability.py.)"""

from __future__ import annotations

import os
import subprocess
import sys

from tests.e2e.conftest import free_port

START_TIMEOUT_S = 180.0


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
