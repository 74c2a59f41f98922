"""One object-store put for the embeddings of every request the ingress takes in one turn of
its event loop, and one call per shard to start them all. Runs in the Serve ingress, on the
replica's event loop."""

from __future__ import annotations

import asyncio
from typing import Callable

from api.metrics import Metrics
from api.responses import Choice
from cluster.prompts import EnginePrompt

# (the request's prompts, what starts its choices from their put prompts, its future)
Pending = tuple[list[EnginePrompt], Callable[[list[EnginePrompt]], list[Choice]], asyncio.Future]


class PutBatcher:
    """Requests whose embeddings are decoded on the event loop wait here for the loop's next
    turn; then one put holds all of their rows (EngineClient.put_prompts: a list, each prompt
    by its index) and their choices start inside one engine.together() block.

    Under load the loop reads several requests' bodies in the same turn (their data came in
    one poll of the sockets). A put costs about 0.7 ms of the loop's time whatever its size
    (a (64, 4096) bf16 prompt on the H200 host, BENCHMARKS.md "Online serving", session 20), its
    hasher call and its shard calls more; with one of each per turn the loop has that much
    more for the streams. A lone request waits for nothing but the rest of the turn it
    arrived in."""

    def __init__(self, engine, metrics: Metrics):
        self.engine = engine
        self.metrics = metrics
        self._pending: list[Pending] = []

    async def start(self, prompts: list[EnginePrompt],
                    start: Callable[[list[EnginePrompt]], list[Choice]]) -> list[Choice]:
        """start(the prompts, their embeddings put), called with the rest of this turn's
        requests; its choices. Raises what the put or start raised. A request cancelled
        while waiting (its client gone) is never started, or, started, is closed."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending.append((prompts, start, future))
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.exception() is None:
                for choice in future.result():  # started, but nobody left to read or end it
                    choice.stream.close()
            raise

    def _flush(self) -> None:
        batch = [pending for pending in self._pending if not pending[2].cancelled()]
        self._pending = []
        if not batch:
            return
        try:
            put = self.engine.put_prompts([prompt for prompts, _, _ in batch for prompt in prompts])
        except Exception as exc:  # noqa: BLE001 - a full store, a dead node: each request's error
            for _, _, future in batch:
                future.set_exception(exc)
            return
        self.metrics.observe_embeds_put(len(batch))
        offset = 0
        with self.engine.together():  # one call per shard for them all
            for prompts, start, future in batch:
                share, offset = put[offset:offset + len(prompts)], offset + len(prompts)
                try:
                    future.set_result(start(share))
                except Exception as exc:  # noqa: BLE001 - an APIError, a dead engine: this request's
                    future.set_exception(exc)
