"""The Ray Serve deployment: one replica owns one tensor-parallel engine whose shards sit
in the replica's placement group, and serves the FastAPI app around it."""

from __future__ import annotations

import logging

from ray import serve
from ray.util.placement_group import get_current_placement_group

from api.metrics import Metrics
from api.routes import build_fastapi_app
from api.serving import OpenAIServing
from api.settings import ServerSettings
from cluster.async_engine import AsyncEngine

logger = logging.getLogger(__name__)


@serve.deployment(
    name="ShardServe",
    max_ongoing_requests=1024,  # the engine queues and batches; Serve should not
    health_check_period_s=10,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=30,
)
@serve.ingress()
class ShardServeServer:
    def __init__(self, settings: ServerSettings):
        self.settings = settings
        # Shards go into this replica's own placement group (bundle i for rank i).
        self.engine = AsyncEngine(settings.engine_args(), placement_group=get_current_placement_group())
        self.serving = OpenAIServing(
            self.engine,
            served_model_name=settings.model_name(),
            enable_prompt_embeds=settings.enable_prompt_embeds,
            max_embeds_bytes=settings.max_prompt_embeds_bytes,
            metrics=Metrics(),
        )
        logger.info("shardserve replica ready: model %s, tp=%d",
                    settings.model_name(), settings.tensor_parallel_size)

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
