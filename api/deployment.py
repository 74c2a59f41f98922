"""The Ray Serve deployments. ShardServe, the ingress: with one API server per engine, each
replica owns one tensor-parallel engine whose shards sit in the replica's placement group,
and serves the FastAPI app around it. With api_server_count > 1, ShardServeEngine's replicas
own the engines (and serve no HTTP), and each ShardServe replica attaches to one of them."""

from __future__ import annotations

import asyncio
import logging
import time

import ray
from ray import serve
from ray.util.placement_group import get_current_placement_group

from api.embeds_codec import slow_base64_warning
from api.ingress import raise_body_buffer_limit
from api.metrics import Metrics
from api.routes import build_fastapi_app
from api.serving import OpenAIServing
from api.settings import ServerSettings
from cluster.async_engine import AsyncEngine
from cluster.engine_client import EngineAttachment, EngineClient, EngineDeadError

logger = logging.getLogger(__name__)

# An API server that found every engine with its count of API servers asks again after this
# long, doubling to the most: an engine is still starting, or the client of an API server
# that died has not yet been dropped (workers.step_loop.CLIENT_TIMEOUT_S).
ATTACH_RETRY_S = 0.1
ATTACH_RETRY_MAX_S = 2.0
# An API server first asks for an engine on its own node, for this long (every
# ATTACH_RETRY_S): there its puts of embeddings rows are where the shards read them. Then any
# engine with room takes it, and that engine's shards read its rows across the network.
LOCAL_ATTACH_WAIT_S = 10.0
# An engine being stopped waits for its API servers to detach, or for this long with no
# request running or waiting in it.
IDLE_BEFORE_STOP_S = 2.0


@serve.deployment(
    name="ShardServe",
    # The replica bounds its own queue (max_num_seqs + max_waiting_requests choices, then
    # 503 + Retry-After); Serve's per-proxy queue is bounded too, never unbounded.
    max_ongoing_requests=2048,
    max_queued_requests=512,
    # check_health only reads a flag: probing often shortens recovery from a dead shard.
    health_check_period_s=2,
    health_check_timeout_s=30,
)
@serve.ingress()
class ShardServeServer:
    async def __init__(self, settings: ServerSettings, engines=None):
        """`engines`: ShardServeEngine's handle, with api_server_count > 1 (this replica
        attaches to one of its engines); None: this replica owns an engine."""
        self.settings = settings
        raise_body_buffer_limit()  # with the haproxy ingress, this replica's uvicorn reads the bodies
        if engines is None:
            # Shards go into this replica's own placement group (bundle i for rank i), named
            # shardserve-<app>-<replica>-rank<r> so an operator can find them.
            self.engine = AsyncEngine(settings.engine_args(), placement_group=get_current_placement_group(),
                                      name=_engine_name(), step_timeout_s=settings.step_timeout_s)
            metrics = Metrics(stats_source=self.engine.stats)
        else:
            attachment, reports_engine = await _attachment(engines)
            self.engine = AsyncEngine.attach(settings.engine_args(), attachment, step_timeout_s=settings.step_timeout_s)
            metrics = Metrics(stats_source=self.engine.stats, api_servers=settings.api_server_count,
                              export_engine_stats=reports_engine)
            logger.info("API server attached to engine %s as its client %d%s", attachment.name, attachment.client,
                        " (reports the engine's figures to Ray's metrics)" if reports_engine else "")
        self.serving = OpenAIServing(
            self.engine,
            served_model_name=settings.model_names(),
            enable_prompt_embeds=settings.enable_prompt_embeds,
            max_embeds_bytes=settings.max_prompt_embeds_bytes,
            metrics=metrics,
            max_in_flight=settings.max_in_flight,
            enable_prompt_tokens_details=settings.enable_prompt_tokens_details,
        )
        logger.info("shardserve replica ready: model %s, tp=%d",
                    settings.model_name(), settings.tensor_parallel_size)
        if settings.enable_prompt_embeds and (warning := slow_base64_warning()):
            logger.warning(warning)

    def __serve_build_asgi_app__(self):
        return build_fastapi_app(self.serving, api_key=self.settings.api_key,
                                 max_body_bytes=self.settings.max_request_bytes)

    def check_health(self) -> None:
        """Raises once the engine died, so Serve replaces this replica and its shards."""
        self.engine.check_health()

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


@serve.deployment(
    name="ShardServeEngine",
    health_check_period_s=2,
    health_check_timeout_s=30,
)
class ShardServeEngine:
    """One tensor-parallel engine's owner, with api_server_count > 1: its shards sit in this
    replica's placement group, as ShardServe's do with one API server; it serves no HTTP.
    api_server_count ShardServe replicas attach to it (open_client), and each sends requests
    to the shards and reads its outputs directly, never through this replica."""

    def __init__(self, settings: ServerSettings):
        self.settings = settings
        config, _ = settings.engine_args().resolve()
        self.engine = EngineClient(config, get_current_placement_group(), name=_engine_name(),
                                   step_timeout_s=settings.step_timeout_s)
        self._opening = asyncio.Lock()
        self._reporter: int | None = None  # the API server that hands the engine's figures to Ray
        self.node_id = _this_node()  # bundle 0's: the leader's node
        logger.info("shardserve engine %s ready: model %s, tp=%d, for %d API servers", self.engine.name,
                    settings.model_name(), settings.tensor_parallel_size, settings.api_server_count)

    async def open_client(self, node_id: str | None = None) -> tuple[EngineAttachment, bool, str] | None:
        """An outbox at the leader for one more API server, whether that one reports the
        engine's figures to Ray's metrics (one API server does: the first, or the next once
        that one is gone), and this engine's node. None when this engine has its
        api_server_count of them already, or when `node_id` (the API server's node, while it
        looks for an engine on it) is another node: the API server then asks again, and
        Serve's router may send the call to another engine."""
        if node_id is not None and node_id != self.node_id:
            return None
        async with self._opening:  # one count and open at a time: never one too many
            clients = await asyncio.to_thread(self.engine.clients)
            if len(clients) - 1 >= self.settings.api_server_count:  # the owner is one of them
                return None
            attachment = await asyncio.to_thread(self.engine.open_client, self.settings.api_server_count)
            reports = self._reporter not in clients
            if reports:
                self._reporter = attachment.client
            return attachment, reports, self.node_id

    def check_health(self) -> None:
        """Raises once the engine died, so Serve replaces this replica and its shards (and its
        API servers, whose own checks fail, attach to the new one)."""
        if self.engine.dead_reason is not None:
            raise EngineDeadError(self.engine.dead_reason)

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is None:
            return
        # Serve stops the API servers too, each after its requests in flight finished (or its
        # graceful shutdown timed out), then it detaches: wait for that, not cut them. An API
        # server that Serve killed never detaches (its client expires only after 30 s), so
        # the wait also ends once the engine has run nothing for IDLE_BEFORE_STOP_S.
        deadline = time.monotonic() + self.settings.graceful_shutdown_timeout_s
        idle_since = None
        while engine.dead_reason is None and time.monotonic() < deadline:
            try:
                if len(engine.clients(timeout_s=5.0)) <= 1:
                    break
                stats = engine.stats()
            except Exception:  # noqa: BLE001 - the leader is gone: nothing to wait for
                break
            if stats.num_running or stats.num_waiting:
                idle_since = None
            elif idle_since is None:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > IDLE_BEFORE_STOP_S:
                break
            time.sleep(0.2)
        engine.shutdown()


async def _attachment(engines) -> tuple[EngineAttachment, bool]:
    """An engine's attachment for this API server, and whether it reports the engine's
    figures: asks ShardServeEngine (its router picks the replica) until one has room, for
    LOCAL_ATTACH_WAIT_S an engine on this node only."""
    here = _this_node()
    local_until = time.monotonic() + LOCAL_ATTACH_WAIT_S
    delay = ATTACH_RETRY_S
    while True:
        local = time.monotonic() < local_until
        answer = await engines.open_client.remote(here if local else None)
        if answer is not None:
            break
        await asyncio.sleep(delay)
        if not local:
            delay = min(delay * 2, ATTACH_RETRY_MAX_S)
    attachment, reports, engine_node = answer
    if engine_node != here:
        logger.warning("API server on node %s attached to engine %s on node %s (no engine on its own node had "
                       "room within %g s): that engine's shards read its embeddings rows across the network",
                       here, attachment.name, engine_node, LOCAL_ATTACH_WAIT_S)
    return attachment, reports


def _this_node() -> str:
    return ray.get_runtime_context().get_node_id()


def _engine_name() -> str:
    replica_id = serve.get_replica_context().replica_id
    return f"{replica_id.deployment_id.app_name}-{replica_id.unique_id}"
