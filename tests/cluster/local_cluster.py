"""A real multi-node Ray cluster on this machine for tests: one `ray start --block`
subprocess per node, each told apart by a custom resource, all on free ports, and a
shutdown that waits until every process they started is gone."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import time
from pathlib import Path

from api.ingress import free_port

START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 30.0
STARTED = "Ray runtime started"


def _node_ports() -> list[str]:
    """Every port a node binds, chosen free: two nodes of one host (and other Ray
    clusters on it) must not collide on Ray's fixed defaults."""
    names = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
             "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")
    return [f"--{name}={free_port()}" for name in names]


def _children() -> dict[int, list[int]]:
    """ppid -> pids, read from /proc (no psutil here)."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def descendants(pid: int) -> set[int]:
    tree, found, todo = _children(), set(), [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pids: set[int]) -> set[int]:
    return {pid for pid in pids if Path(f"/proc/{pid}").exists()
            and "zombie" not in _proc_state(pid)}


def _wait_gone(pids: set[int], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while _alive(pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _proc_state(pid: int) -> str:
    try:
        return (Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0]).lower()
    except (OSError, IndexError):
        return "zombie"


class LocalCluster:
    """Nodes of `num_cpus` logical CPUs; node i carries the resource `names[i]`. The head
    runs the dashboard (job server, state API) and exports Ray metrics like every node."""

    def __init__(self, root: Path, names: tuple[str, ...] = ("node_a", "node_b"), num_cpus: int = 3,
                 env: dict[str, str] | None = None):
        self.root, self.names, self.num_cpus = root, names, num_cpus
        # A token of its own: the nodes, drivers and job clients of this cluster share it,
        # whatever ~/.ray holds on this machine.
        self.token = secrets.token_hex(32)
        inherited = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # not the session's Ray
        self.env = {**inherited, **(env or {}), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}
        self.nodes: list[subprocess.Popen] = []
        self.metrics_ports: list[int] = []
        self.dashboard_port = free_port()
        self.address = ""

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def job_client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard_url, headers=self.auth_headers)

    def start(self) -> "LocalCluster":
        try:
            head = [f"--port={free_port()}", f"--dashboard-port={self.dashboard_port}",
                    "--dashboard-host=127.0.0.1", "--include-dashboard=true",
                    f"--ray-client-server-port={free_port()}"]
            self._start_node(0, ["--head", *head])
            # The start banner can reach the log before `ray start` writes this file (seen
            # once: the file was missing when read at once).
            address_file = self._temp_dir(0) / "ray_current_cluster"
            self.address = wait_until(lambda: address_file.is_file() and address_file.read_text().strip(),
                                      START_TIMEOUT_S, "the head's ray_current_cluster file")
            for index in range(1, len(self.names)):
                self._start_node(index, [f"--address={self.address}"])
        except BaseException:
            self.stop()
            raise
        return self

    def _start_node(self, index: int, role: list[str]) -> None:
        ports = _node_ports()
        self.metrics_ports.append(int(ports[-1].split("=")[1]))
        log = self.root / f"{self.names[index]}.log"
        command = ["ray", "start", "--block", *role, f"--num-cpus={self.num_cpus}", "--num-gpus=0",
                   f"--resources={json.dumps({self.names[index]: 10})}", f"--temp-dir={self._temp_dir(index)}",
                   "--object-store-memory=100000000", "--disable-usage-stats", *ports]
        with open(log, "w") as out:
            # A session of its own, so a signal to the test's terminal does not reach it.
            self.nodes.append(subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                               env=self.env, start_new_session=True))
        self._wait_started(self.nodes[-1], log)

    def _temp_dir(self, index: int) -> Path:
        """One per node: nodes sharing a session folder race unpacking the same runtime
        env packages. Short: Ray's socket paths must stay under 108 bytes."""
        return self.root / f"ray{index}"

    @staticmethod
    def _wait_started(node: subprocess.Popen, log: Path) -> None:
        """Bounded polling of the node's log for Ray's start banner."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while STARTED not in log.read_text():
            if node.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start failed ({log}):\n{log.read_text()[-3000:]}")
            time.sleep(0.2)

    def stop(self) -> set[int]:
        """SIGTERM to each `ray start --block` (it stops its node's processes), workers
        first; SIGKILL for whatever outlives STOP_TIMEOUT_S. Returns the pids still alive."""
        started: set[int] = set()
        for node in self.nodes:
            started |= descendants(node.pid) | {node.pid}
        for node in reversed(self.nodes):
            node.send_signal(signal.SIGTERM)
            try:
                node.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait()
        # A driver of the cluster (a job's `serve run`) may keep retrying the dead GCS.
        if not _wait_gone(started, STOP_TIMEOUT_S):
            for pid in _alive(started):
                os.kill(pid, signal.SIGKILL)
            _wait_gone(started, STOP_TIMEOUT_S)
        self.nodes = []
        return _alive(started)


def wait_until(condition, timeout_s: float, what: str, period_s: float = 0.25):
    """Bounded polling of another process: condition()'s first truthy value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout_s} s")
        time.sleep(period_s)
