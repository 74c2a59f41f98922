"""`shardserve serve [MODEL] ...`: starts (or joins) Ray, runs the Serve application on
HOST:PORT, and stays up until Ctrl-C / SIGTERM, then shuts down cleanly."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from api.admission import DEFAULT_MAX_WAITING_REQUESTS
from api.ingress import INGRESSES
from api.settings import ServerSettings
from cluster.engine_client import DEFAULT_STEP_TIMEOUT_S


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardserve", description="Tensor-parallel LLM serving on Ray.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve a model over an OpenAI-compatible API")
    serve.add_argument("model", nargs="?", default=None,
                       help="Hugging Face model folder (default: the built-in tiny model); with "
                            "--load-format dummy, also a shape name from configs/models")
    serve.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    serve.add_argument("--enable-prompt-embeds", action="store_true",
                       help="accept prompt_embeds in /v1/completions (off by default)")
    serve.add_argument("--max-model-len", type=int, default=None)
    serve.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    serve.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"])
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--num-replicas", type=int, default=1, help="engines, each tensor-parallel (default: 1)")
    serve.add_argument("--api-server-count", "-asc", type=int, default=1,
                       help="API servers per engine: processes (Serve replicas) that each take requests in, "
                            "decode prompt_embeds and stream tokens on an event loop of their own (default: 1). "
                            "Above 1 the engines run in a deployment of their own, ShardServeEngine, and the "
                            "API servers attach to them")
    serve.add_argument("--ingress", default="auto", choices=("auto", *INGRESSES),
                       help="how HTTP reaches the replicas: HAProxy in front of replicas that serve HTTP "
                            "themselves (Ray Serve's high-throughput mode), or Serve's proxy actor. auto "
                            "(default): HAProxy where Ray Serve has it (Linux, Ray 2.56 or later), else the "
                            "proxy. Applies to the local Ray started here; a cluster (--address) keeps its own: "
                            "set RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_THROUGHPUT_OPTIMIZED=1 for `ray start`")
    serve.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                       help="the name(s) requests use for the model; the first is the one responses carry "
                            "when a request names none (default: the model's path)")
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1")
    serve.add_argument("--address", default=None, help="join this Ray cluster (default: start a local one)")
    serve.add_argument("--max-num-seqs", type=int, default=256)
    serve.add_argument("--max-num-batched-tokens", type=int, default=None,
                       help="tokens a step may hold; longer prompts are prefilled in chunks "
                            "(default: max-model-len within [2048, 8192] on GPU, 2048 on CPU)")
    serve.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                       help="auto: cuda where the Ray cluster has a GPU for every shard, else cpu (default: auto)")
    serve.add_argument("--placement-strategy", default="STRICT_PACK",
                       choices=["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"])
    serve.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    serve.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    serve.add_argument("--enforce-eager", action="store_true",
                       help="run decode steps eagerly (no CUDA-graph capture)")
    serve.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
                       help="plan the next decode step while the GPU runs this one (default: on)")
    serve.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                       help="reuse the K/V cache of prompt prefixes (token ids or embedding rows) that "
                            "earlier requests computed (default: on)")
    serve.add_argument("--enable-prompt-tokens-details", action="store_true",
                       help="report usage.prompt_tokens_details.cached_tokens: prompt tokens whose K/V "
                            "the prefix cache held")
    serve.add_argument("--disable-custom-all-reduce", action="store_true",
                       help="tensor-parallel all-reduces through NCCL only (no one-shot all-reduce)")
    serve.add_argument("--max-prompt-embeds-bytes", type=int, default=64 << 20,
                       help="largest decoded prompt_embeds payload accepted (bytes)")
    serve.add_argument("--max-waiting-requests", type=int, default=DEFAULT_MAX_WAITING_REQUESTS,
                       help="requests queued beyond --max-num-seqs before new ones get 503 + Retry-After")
    serve.add_argument("--step-timeout-s", type=float, default=DEFAULT_STEP_TIMEOUT_S,
                       help="a step running longer (a hung shard) marks the engine dead; Serve replaces it")
    serve.add_argument("--graceful-shutdown-timeout-s", type=float, default=30.0,
                       help="on SIGTERM / Ctrl-C, how long in-flight requests may run before being cut")
    serve.add_argument("--seed", type=int, default=0)
    return parser


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    return ServerSettings(
        model=args.model, served_model_name=args.served_model_name,
        tensor_parallel_size=args.tensor_parallel_size, enable_prompt_embeds=args.enable_prompt_embeds,
        max_model_len=args.max_model_len, dtype=args.dtype, load_format=args.load_format,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        device=args.device, placement_strategy=args.placement_strategy,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes,
        gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager, seed=args.seed,
        async_scheduling=args.async_scheduling, disable_custom_all_reduce=args.disable_custom_all_reduce,
        enable_prefix_caching=args.enable_prefix_caching,
        enable_prompt_tokens_details=args.enable_prompt_tokens_details,
        num_replicas=args.num_replicas, api_server_count=args.api_server_count, api_key=args.api_key,
        max_prompt_embeds_bytes=args.max_prompt_embeds_bytes,
        max_waiting_requests=args.max_waiting_requests, step_timeout_s=args.step_timeout_s,
        graceful_shutdown_timeout_s=args.graceful_shutdown_timeout_s,
    )


def _local_cpus(settings: ServerSettings) -> int:
    """Logical CPUs for a local Ray: at least what the app's replicas reserve (a shard, an
    engine's replica and an API server each take one), so a TP=2 server starts on a 2-core
    machine too."""
    from api.app import app_cpus

    needed = int(app_cpus(settings)) + 1
    return max(os.cpu_count() or 1, needed)


def serve_command(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from api.app import PROXY_ENV_VARS, build_app, replicas_shortfall, with_resolved_device

    settings = settings_from_args(args)
    if args.address and args.ingress == "haproxy":
        raise ValueError(f"--ingress {args.ingress} sets up the local Ray that `shardserve serve` starts; a "
                         "cluster's ingress is its own: start every node's Ray with RAY_SERVE_ENABLE_HA_PROXY=1 "
                         "RAY_SERVE_THROUGHPUT_OPTIMIZED=1 in the environment of `ray start`")
    # A device named on the command line needs no cluster to check the engine's settings
    # against: a bad one stops the CLI before a Ray starts or is joined (seconds, not tens).
    checked_early = settings.device != "auto"
    if checked_early:
        _check_engine_settings(settings)
    if not args.address and settings.device == "cpu":  # the Ray started below: one node of these CPUs
        shortfall = replicas_shortfall(settings, nodes=[{"CPU": float(_local_cpus(settings))}])
        if shortfall:
            raise _unplaceable_here(settings, shortfall)
    if args.address:
        ray.init(address=args.address, log_to_driver=False)
    else:
        # The local Ray's processes (Serve's proxy or HAProxy among them) inherit this environment.
        for name, value in PROXY_ENV_VARS.items():
            os.environ.setdefault(name, value)
        ingress = _local_ingress(args.ingress)
        ray.init(num_cpus=_local_cpus(settings), log_to_driver=False)
    # "auto" resolved once, against the cluster joined: the checks, the placement and the
    # app then agree, and a warning that it fell back to CPU comes once.
    settings = with_resolved_device(settings)
    if not checked_early:
        _check_engine_settings(settings)
    shortfall = replicas_shortfall(settings)
    if shortfall and not args.address:  # a Ray started here cannot grow
        raise _unplaceable_here(settings, shortfall)
    if shortfall:
        print(f"shardserve: warning: {shortfall}; Serve waits for the cluster to grow (an autoscaler) and "
              "logs while it waits", file=sys.stderr, flush=True)
    # Before anything is served (and after ray.init, whose handler would only log): a
    # signal during start-up still ends in the drain below.
    stop = StopRequest()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_app(settings), name="shardserve", route_prefix="/", blocking=False)
    print(f"shardserve: serving {settings.model_name()} at http://{args.host}:{args.port}/v1 "
          f"(tensor_parallel_size={settings.tensor_parallel_size}, "
          f"{f'{settings.api_server_count} API servers per engine, ' if settings.api_server_count > 1 else ''}"
          f"prompt_embeds {'on' if settings.enable_prompt_embeds else 'off'}"
          f"{'' if args.address else f', {ingress}'}); Ctrl-C to stop", flush=True)
    stop.event.wait()
    _shutdown(settings, joined=bool(args.address))
    return 0


def _local_ingress(choice: str) -> str:
    """Sets up the ingress of the local Ray about to start (its processes inherit this
    environment); returns how the startup line names it. "auto" takes HAProxy where Ray
    Serve has it: every request's body and tokens then skip the proxy actor's Ray calls
    (on the 8B shape, 3.5 ms of serving overhead against 10.1: BENCHMARKS.md, "Online
    serving", session 34)."""
    from api.ingress import local_haproxy_env

    if choice == "proxy":
        return "Serve's proxy"
    try:
        os.environ.update(local_haproxy_env())
    except ValueError as exc:
        if choice == "haproxy":
            raise
        print(f"shardserve: HAProxy ingress not available ({exc}); HTTP goes through Serve's proxy",
              file=sys.stderr, flush=True)
        return "Serve's proxy"
    return "HAProxy ingress"


def _unplaceable_here(settings: ServerSettings, shortfall: str) -> ValueError:
    api_servers = f" with api_server_count={settings.api_server_count}" if settings.api_server_count > 1 else ""
    return ValueError(f"cannot place tensor_parallel_size={settings.tensor_parallel_size} x "
                      f"num_replicas={settings.num_replicas}{api_servers} on this machine: {shortfall}; lower them, "
                      "or join a larger cluster with --address")


class StopRequest:
    """The SIGINT / SIGTERM handler of `shardserve serve`: sets `event` once.

    Python runs signal handlers in the main thread between any two bytecodes, so a signal
    that lands while an earlier handler is inside Event.set (a second Ctrl-C, a wrapper
    such as `timeout` forwarding the same signal, a supervisor's SIGTERM after SIGINT)
    runs nested in it. Calling set() again there would wait forever for the lock the outer
    call holds, and the server would never shut down. Only the first signal reaches the
    Event; later ones return at once."""

    def __init__(self):
        self.event = threading.Event()
        self._requested = False

    def __call__(self, signum=None, frame=None) -> None:
        if self._requested:
            return
        self._requested = True  # before set(): a handler nested from here on returns above
        self.event.set()


def _check_engine_settings(settings: ServerSettings) -> None:
    """A bad engine setting (a context past the model's positions, heads that do not split
    over the shards, ...) as a ValueError here, not as a failed deployment after the
    replicas tried. Only where the model folder is on this node too (or the built-in
    model); otherwise the replicas check it where it is."""
    if settings.model is None or Path(settings.model).is_dir():
        settings.engine_args().resolve()


def _shutdown(settings: ServerSettings, joined: bool) -> None:
    import ray
    from ray import serve

    print(f"shardserve: shutting down; in-flight requests get up to {settings.graceful_shutdown_timeout_s:g} s "
          "to finish", flush=True)
    # Deleting the application first drains its replicas while the proxy still carries their
    # streams; serve.shutdown() alone would stop the proxy under them.
    serve.delete("shardserve")
    if joined:  # a cluster's Serve outlives this process otherwise (as `serve run` stops it)
        serve.shutdown()
    # A local Ray goes whole, Serve's controller and proxy with it. serve.shutdown() there
    # would only add Ray's warning that the controller's graceful_shutdown call "failed" as
    # the controller is killed under it.
    ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return serve_command(args)
    except ValueError as exc:
        print(f"shardserve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
