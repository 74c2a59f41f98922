"""The Ray Serve deployment: one replica owns one tensor-parallel engine whose shards sit
in the replica's placement group, and serves the FastAPI app around it."""

from __future__ import annotations

import logging

from ray import serve
from ray.util.placement_group import get_current_placement_group

from api.embeds_codec import slow_base64_warning
from api.ingress import raise_body_buffer_limit
from api.metrics import Metrics
from api.routes import build_fastapi_app
from api.serving import OpenAIServing
from api.settings import ServerSettings
from cluster.async_engine import AsyncEngine

logger = logging.getLogger(__name__)


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
    def __init__(self, settings: ServerSettings):
        self.settings = settings
        raise_body_buffer_limit()  # with the haproxy ingress, this replica's uvicorn reads the bodies
        # Shards go into this replica's own placement group (bundle i for rank i), named
        # shardserve-<app>-<replica>-rank<r> so an operator can find them.
        self.engine = AsyncEngine(settings.engine_args(), placement_group=get_current_placement_group(),
                                  name=_engine_name(), step_timeout_s=settings.step_timeout_s)
        self.serving = OpenAIServing(
            self.engine,
            served_model_name=settings.model_names(),
            enable_prompt_embeds=settings.enable_prompt_embeds,
            max_embeds_bytes=settings.max_prompt_embeds_bytes,
            metrics=Metrics(stats_source=self.engine.stats),
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


def _engine_name() -> str:
    replica_id = serve.get_replica_context().replica_id
    return f"{replica_id.deployment_id.app_name}-{replica_id.unique_id}"
