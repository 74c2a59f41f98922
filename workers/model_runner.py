"""Turns a StepPlan into one sharded forward pass. Every shard keeps the same mirror of
request state (tokens, prompt embeddings, block table) and applies the same plan.
Runs in each shard process."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from workers.intake import Intake, RequestState
from workers.attention import Attention, AttentionMetadata, allocate_kv_caches, kv_cache_bytes_per_block
from workers.config import EngineConfig
from workers.cuda_graphs import MAX_GRAPH_SPANS, DecodeGraphs, GraphSpan, PrefillGraphs
from workers.kernels import gemv, paged_attention, paged_prefill
from workers.kernels.argmax import argmax
from workers.loader import load_weights
from workers.messages import PromptLogprobs, ScheduledRequest, StepPlan
from workers.models import get_model_class
from workers.parallel import ProcessGroup
from workers.prompt_logprobs import compute_prompt_logprobs, prompt_logprob_rows
from workers.transfer import to_device

# SHARDSERVE_PREFILL_GRAPHS=0 runs one request's prefill eagerly (an ablation switch).
USE_PREFILL_GRAPHS = os.environ.get("SHARDSERVE_PREFILL_GRAPHS", "1") != "0"
# A step of more requests than the prefill graphs hold (MAX_GRAPH_SPANS), of decodes and at
# most this many prefills (or chunks), runs as graph replays: the decodes' decode graph,
# then each prefill's prefill graph. Each replay reads the weights once; run eagerly, such a
# step is bound by the host's launches (8B shape, one H200: five decodes and a 64-row
# prefill, 47 ms eagerly against 4.7 ms for a decode step; BENCHMARKS.md, "Mixed steps").
MAX_GRAPH_PREFILLS = 4
CPU_KV_CACHE_BYTES = 512 << 20  # on CPU the cache is sized in bytes, as vLLM's CPU backend does
GIB = 1 << 30


# (first row of the step, the embeddings rows from there on)
EmbedsPiece = tuple[int, torch.Tensor]


@dataclass(frozen=True)
class StepInputs:
    input_ids: torch.Tensor  # [N]
    attn_metadata: AttentionMetadata
    input_embeds: torch.Tensor | None  # [N, hidden], rows used where embeds_mask (all: no mask)
    embeds_mask: torch.Tensor | None  # [N] bool
    sample_rows: torch.Tensor  # [M] index of each sampled request's last row


class ModelRunner:
    def __init__(self, config: EngineConfig, pg: ProcessGroup, device: torch.device):
        self.config = config
        self.pg = pg
        self.device = device
        model_config = config.model_config
        self.model = get_model_class(model_config.architecture)(
            model_config, pg, config.torch_dtype, device
        )
        load_weights(self.model, config.model, config.load_format, seed=config.seed)
        self.model.eval()
        # Blocks the scheduler hands out are ids < num_blocks; one more past them is the
        # scratch block that padding rows of captured decode steps write to.
        self.num_blocks = pg.all_reduce_min(self._num_blocks_that_fit()) - 1
        self.kv_caches = allocate_kv_caches(
            model_config, pg, self.num_blocks + 1, config.block_size, config.torch_dtype, device
        )
        self.decode_graphs = self._make_decode_graphs()
        self.prefill_graphs = self._make_prefill_graphs()
        self._warm_up_eager_steps()
        self.requests: dict[str, RequestState] = {}
        # Blocks this rank filled from a stand-in (a request it could not take): its K/V
        # there are not the request's, so no other request may read them as its prefix.
        self._stand_in_blocks: set[int] = set()
        self._last_sampled_ids: tuple[str, ...] = ()  # the last executed step's, in order
        # From a feeds_back plan: the previous step's sampled tokens, still on the device,
        # and each request's index in them; rows the mirrors cannot fill read from here.
        self._feedback: tuple[dict[str, int], torch.Tensor] | None = None
        self._last_logits: torch.Tensor | None = None  # the last executed step's, sampled rows
        self._prompt_logprobs: dict[str, PromptLogprobs] = {}  # the leader's, from the last step
        self.num_argmax_feedback_steps = 0  # followers: feedback taken from their own logits

    @torch.inference_mode()
    def _warm_up_eager_steps(self) -> None:
        """Runs the eager step shapes once while the engine starts. Triton compiles a
        kernel at its first launch with a new specialization, and the graphs' capture
        launches only its own (attention over fixed-width int32 tables, the prefill kernel
        on a block map). Without this, the first step too large for the graphs compiled
        the eager variants, and its requests waited. The shapes are: decodes beside prefill
        spans, and prefills alone, over int64 block tables of the step's own width; 1 to
        MAX_ROWS decodes alone, with contexts long enough for several splits; the LM head
        on 1 to MAX_ROWS sampled rows (the GEMV's per-row variants; the graphs sample 1, 2,
        4, ...); and greedy sampling's argmax over those logits. Every rank runs the same
        steps, so their collectives pair up. The rows write and read only the scratch
        block. On CPU nothing compiles; the steps run anyway, so that the tests cover this
        path."""
        block_size, max_len = self.config.block_size, self.config.max_model_len
        # (num_computed_tokens, num_new_tokens, table width): short contexts (one tile of
        # keys: decode attention in one split) in two blocks, long ones in up to 4 tiles.
        n = min(2 * block_size, max_len)
        steps = [([n // 4, n // 2, n - 1, 0, 0], [1, 1, 1, min(5, n), n], 2), ([0], [n], 2)]
        # Decodes alone, 1 to MAX_ROWS of them, in several splits: the projections' GEMV
        # variants of an eager engine (--enforce-eager); the graphs capture their own.
        long = min(4 * paged_attention.TILE_KEYS, max_len)
        steps += [([max(long - 1 - i, 0) for i in range(rows)], [1] * rows, -(-long // block_size))
                  for rows in range(1, gemv.MAX_ROWS + 1)]
        for index, (computed, new, width) in enumerate(steps):
            tables = [[self.num_blocks] * width] * len(new)  # the scratch block, `width` times
            metadata = AttentionMetadata.build(computed, new, tables, block_size, self.device)
            ids = torch.zeros(sum(new), dtype=torch.long, device=self.device)
            hidden = self.model(ids, metadata.positions, metadata, self.kv_caches)
            if index == 0:  # the LM head on the sampled rows of an eager mixed step
                for rows in range(1, min(gemv.MAX_ROWS, hidden.shape[0]) + 1):
                    logits = self.model.compute_logits(hidden[:rows])
                # Greedy sampling's argmax (the sampler's, and followers' greedy feedback):
                # no graph captures it, so without this its first step compiled it.
                argmax(logits)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _make_decode_graphs(self) -> DecodeGraphs | None:
        config = self.config
        head_dim = config.model_config.head_dim
        if config.enforce_eager or not DecodeGraphs.supports(self.device, head_dim, config.block_size):
            return None
        graphs = self.new_decode_graphs()
        graphs.capture_all()
        return graphs

    def new_decode_graphs(self) -> DecodeGraphs:
        """Decode graphs' buffers for this runner, not captured (captured, they replay;
        uncaptured, they run the same padded step eagerly)."""
        config = self.config
        return DecodeGraphs(
            self.model, self.kv_caches, max_num_seqs=config.max_num_seqs,
            max_blocks_per_seq=-(-config.max_model_len // config.block_size),
            block_size=config.block_size, scratch_block=self.num_blocks, device=self.device,
        )

    def _make_prefill_graphs(self) -> PrefillGraphs | None:
        config = self.config
        head_dim = config.model_config.head_dim
        if (config.enforce_eager or not USE_PREFILL_GRAPHS
                or not PrefillGraphs.supports(self.device, head_dim, config.block_size)):
            return None
        graphs = self.new_prefill_graphs()
        if not graphs.buckets:
            return None
        graphs.capture_all()
        return graphs

    def new_prefill_graphs(self, max_spans: int = MAX_GRAPH_SPANS) -> PrefillGraphs:
        """Prefill graphs' buffers for this runner, not captured (captured, they replay;
        uncaptured, they run the same padded step eagerly)."""
        config = self.config
        return PrefillGraphs(
            self.model, self.kv_caches,
            max_tokens=config.max_num_batched_tokens,
            max_blocks_per_seq=-(-config.max_model_len // config.block_size), block_size=config.block_size,
            scratch_block=self.num_blocks, hidden_size=config.model_config.hidden_size,
            dtype=config.torch_dtype, device=self.device, max_spans=max_spans,
            rows_per_program=self._prefill_rows_per_program(),
        )

    def _prefill_rows_per_program(self) -> int:
        """The prefill kernel's query rows per program for this rank's attention heads."""
        attention = next(m for m in self.model.modules() if isinstance(m, Attention))
        return paged_prefill.query_rows_per_program(attention.num_heads, attention.num_kv_heads)

    def _num_blocks_that_fit(self) -> int:
        per_block = kv_cache_bytes_per_block(
            self.config.model_config,
            self.pg.world_size,
            self.config.block_size,
            self.config.torch_dtype,
        )
        budget = self.config.kv_cache_memory_bytes
        measured = ""
        if budget is None and self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            used = total - free
            budget = int(total * self.config.gpu_memory_utilization) - used
            measured = (f" (gpu_memory_utilization={self.config.gpu_memory_utilization} of the GPU's "
                        f"{total / GIB:.1f} GiB, of which {used / GIB:.1f} GiB are in use already: the weights, "
                        "other processes)")
        elif budget is None:
            budget = CPU_KV_CACHE_BYTES
        num_blocks = max(budget, 0) // per_block
        min_blocks = self.config.max_model_len // self.config.block_size + 2
        if num_blocks < min_blocks:
            raise ValueError(
                f"the KV cache holds {num_blocks} blocks of {self.config.block_size} tokens{measured}, "
                f"fewer than one request of max_model_len={self.config.max_model_len} needs; "
                "lower max_model_len or give the cache more memory (gpu_memory_utilization, kv_cache_memory_bytes)"
            )
        return int(num_blocks)

    def apply(self, plan: StepPlan, intake: Intake, intake_timeout_s: float,
              sampled_token_ids: torch.Tensor | None = None) -> None:
        """Applies the plan's deltas to the mirrors; a request scheduled the first time
        is taken from the intake, where its data arrived through Ray. For a feeds_back
        plan the leader passes the previous step's sampled token ids (on the device);
        followers receive them by broadcast, in stream order, or, when they were greedy
        (feedback_is_argmax), take the argmax of their own copy of that step's logits."""
        self._feedback = None
        if plan.feeds_back:
            if not plan.feedback_is_argmax:
                if sampled_token_ids is None:
                    sampled_token_ids = torch.empty(len(self._last_sampled_ids), dtype=torch.long, device=self.device)
                self.pg.broadcast(sampled_token_ids)
            elif sampled_token_ids is None:  # a follower: the argmax of its copy of the same logits
                sampled_token_ids = argmax(self._last_logits)
                self.num_argmax_feedback_steps += 1
            self._feedback = ({r: i for i, r in enumerate(self._last_sampled_ids)}, sampled_token_ids)
        for req_id in plan.finished_req_ids:
            if self.requests.pop(req_id, None) is None:
                intake.drop(req_id)
        for req_id in plan.preempted_req_ids:
            self.requests[req_id].block_ids.clear()
        for req_id, token in plan.appended_tokens:
            state = self.requests.get(req_id)
            if state is not None:
                state.output_token_ids.append(token)
        for sched in plan.scheduled:
            state = self.requests.get(sched.req_id)
            if state is None:
                state = intake.take(sched.req_id, intake_timeout_s)
                self.requests[sched.req_id] = state
            if state.stand_in or self._stand_in_blocks:
                self._check_stand_in_blocks(state, sched)
            state.block_ids.extend(sched.new_block_ids)

    def _check_stand_in_blocks(self, state: RequestState, sched: ScheduledRequest) -> None:
        """Tracks the blocks stand-ins write, and refuses to let a request read one as its
        cached prefix. The leader forgets a stand-in's keys once it hears of the failure;
        a request that shared them before that would get wrong tokens from this rank, so
        the step fails instead (the engine stops, loudly)."""
        num_shared = 0 if state.block_ids else sched.num_computed_tokens // self.config.block_size
        shared, fresh = sched.new_block_ids[:num_shared], sched.new_block_ids[num_shared:]
        if state.stand_in:
            self._stand_in_blocks.update(fresh)
            return
        self._stand_in_blocks.difference_update(fresh)
        if self._stand_in_blocks.intersection(shared):
            raise RuntimeError(f"request {sched.req_id} shares cached K/V that rank {self.pg.rank} computed "
                               "for a request it could not take")

    @torch.inference_mode()
    def execute(self, scheduled: tuple[ScheduledRequest, ...]) -> torch.Tensor | None:
        """Runs the forward pass; returns float32 logits [M, vocab] of the sampled rows
        (in `scheduled` order), the same on every rank; None when no row is sampled."""
        self._last_sampled_ids = tuple(s.req_id for s in scheduled if s.is_sampled)
        self._prompt_logprobs = {}
        self._last_logits = self._execute(scheduled)
        for sched in scheduled:
            if sched.is_sampled:
                self.requests[sched.req_id].first_sampled = True
        return self._last_logits

    def take_prompt_logprobs(self) -> dict[str, PromptLogprobs]:
        """The leader's: prompt log-probabilities the last execute() computed, by request."""
        taken, self._prompt_logprobs = self._prompt_logprobs, {}
        return taken

    def _execute(self, scheduled: tuple[ScheduledRequest, ...]) -> torch.Tensor | None:
        if not scheduled:
            return None
        if self._is_graphable(scheduled):  # decodes: no row predicts a prompt token
            return self._execute_graph(scheduled)
        prompt_rows = prompt_logprob_rows(scheduled, self.requests)
        if self.prefill_graphs is not None and not prompt_rows:  # the graphs keep only the last row
            logits = self._execute_in_graphs(scheduled)
            if logits is not False:
                return logits
        inputs = self._prepare(scheduled)
        hidden = self.model(
            inputs.input_ids,
            inputs.attn_metadata.positions,
            inputs.attn_metadata,
            self.kv_caches,
            input_embeds=inputs.input_embeds,
            embeds_mask=inputs.embeds_mask,
        )
        if prompt_rows:
            self._prompt_logprobs = compute_prompt_logprobs(self.model, hidden, prompt_rows, self.pg.is_leader)
        if inputs.sample_rows.numel() == 0:
            return None
        return self.model.compute_logits(hidden[inputs.sample_rows])

    def _is_graphable(self, scheduled: tuple[ScheduledRequest, ...]) -> bool:
        """One token-id row per request (decodes): what the captured graphs run."""
        return self._fits_decode_graphs(scheduled) and all(self._is_decode(s) for s in scheduled)

    def _fits_decode_graphs(self, decodes) -> bool:
        return self.decode_graphs is not None and len(decodes) <= self.decode_graphs.buckets[-1]

    def _is_decode(self, sched: ScheduledRequest) -> bool:
        """One sampled token-id row (not a prompt's embedding row): a decode graph's row."""
        state = self.requests[sched.req_id]
        return (sched.num_new_tokens == 1 and sched.is_sampled
                and not (state.prompt_embeds is not None and sched.num_computed_tokens < state.prompt_len))

    def _execute_graph(self, scheduled: tuple[ScheduledRequest, ...]) -> torch.Tensor | None:
        positions = [s.num_computed_tokens for s in scheduled]
        states = [self.requests[s.req_id] for s in scheduled]
        input_ids, fed = [], []
        for row, (sched, state) in enumerate(zip(scheduled, states)):
            ids = state.token_ids(sched.num_computed_tokens, sched.num_computed_tokens + 1)
            if not ids:  # the previous step's sample, still on the device
                fed.append((row, sched.req_id))
            input_ids.append(ids[0] if ids else 0)
        return self.decode_graphs.run(input_ids, positions, [state.block_ids for state in states],
                                      self._fed_tokens(fed))

    def _execute_in_graphs(self, scheduled: tuple[ScheduledRequest, ...]):
        """A step of prefills (or prefill chunks) and decodes through the captured graphs,
        in the same order on every rank. Up to MAX_GRAPH_SPANS requests in at most the
        largest bucket's rows: one replay of the prefill graphs, decodes as one-row spans,
        so the weights are read once. More requests (many decodes beside a few prefills):
        the decodes' decode graph, then each of up to MAX_GRAPH_PREFILLS prefills in its own
        replay. Logits of the sampled rows in `scheduled` order (None when none samples);
        False when the step is neither: a prefill of rows whose token is still being fed
        back, past the largest bucket, or more prefills or decodes than the graphs hold."""
        spans, fed = [], []  # fed: (row, req_id) of decode rows whose token is fed back
        num_rows = 0
        for sched in scheduled:
            taken = self._graph_span(sched)
            if taken is None:
                return False
            span, fed_back = taken
            if fed_back:
                fed.append((num_rows, sched.req_id))
            spans.append(span)
            num_rows += len(span.ids)
        graphs = self.prefill_graphs
        if len(spans) <= graphs.max_spans and graphs.bucket_for(num_rows) is not None:
            return graphs.run(spans, self._fed_tokens(fed))
        decodes = tuple(s for s in scheduled if self._is_decode(s))
        prefills = [(s, span) for s, span in zip(scheduled, spans) if not self._is_decode(s)]
        if (len(prefills) > MAX_GRAPH_PREFILLS or (decodes and not self._fits_decode_graphs(decodes))
                or any(graphs.bucket_for(len(span.ids)) is None for _, span in prefills)):
            return False
        pieces = []  # (sampled req_ids, their logits)
        if decodes:
            pieces.append(([s.req_id for s in decodes], self._execute_graph(decodes)))
        for sched, span in prefills:
            logits = graphs.run([span])
            if sched.is_sampled:
                # A graph's output lives in its pool, which the next prefill graph's replay
                # may write: copied out.
                pieces.append(([sched.req_id], logits.clone() if logits is not None else None))
        if not pieces:
            return None
        if len(pieces) == 1:
            return pieces[0][1]
        rows = {req_id: logits[i] for req_ids, logits in pieces for i, req_id in enumerate(req_ids)}
        return torch.stack([rows[s.req_id] for s in scheduled if s.is_sampled])

    def _graph_span(self, sched: ScheduledRequest) -> tuple[GraphSpan, bool] | None:
        """The request's rows as the prefill graphs take them, and whether they are a
        decode row whose token is the previous step's sample, still on the device (its
        span's one id a placeholder, overwritten on the device); None for a prefill (chunk)
        of such rows."""
        state = self.requests[sched.req_id]
        start, end = sched.num_computed_tokens, sched.num_computed_tokens + sched.num_new_tokens
        ids = state.token_ids(start, end)
        if len(ids) < end - start:
            if ids or not self._is_decode(sched):
                return None
            return GraphSpan([0], start, state.block_ids, [], sched.is_sampled), True
        return GraphSpan(ids, start, state.block_ids, state.embeds_rows(start, end), sched.is_sampled), False

    def _fed_tokens(self, fed: list[tuple[int, str]]):
        """(index, tokens) for the rows whose input token is fed back: write tokens into
        the step's input ids at index (a slice when the rows and the previous step's order
        are the same, as in steady decoding); None when no row is fed back."""
        if not fed:
            return None
        if self._feedback is None:
            raise RuntimeError(f"step input of {fed[0][1]!r} is unknown and not fed back")
        order, tokens = self._feedback
        rows = [row for row, _ in fed]
        sources = [order[req_id] for _, req_id in fed]
        if sources != list(range(tokens.shape[0])):
            tokens = tokens[to_device(sources, self.device, torch.long)]
        if rows == list(range(len(rows))):
            return slice(0, len(rows)), tokens
        return to_device(rows, self.device, torch.long), tokens

    def _prepare(self, scheduled: tuple[ScheduledRequest, ...]) -> StepInputs:
        input_ids: list[int] = []
        fed: list[tuple[int, str]] = []  # (row, req_id) of rows whose token is fed back
        sample_rows: list[int] = []
        embeds_pieces: list[EmbedsPiece] = []
        for sched in scheduled:
            state = self.requests[sched.req_id]
            start, end = sched.num_computed_tokens, sched.num_computed_tokens + sched.num_new_tokens
            embeds_pieces += [(len(input_ids) + offset, rows) for offset, rows in state.embeds_rows(start, end)]
            ids = state.token_ids(start, end)
            if len(ids) < end - start:  # a decode row of a feeds_back plan: fed back below
                fed.append((len(input_ids), sched.req_id))
                ids = [0]
            input_ids.extend(ids)
            if sched.is_sampled:
                sample_rows.append(len(input_ids) - 1)
        attn_metadata = AttentionMetadata.build(
            [s.num_computed_tokens for s in scheduled],
            [s.num_new_tokens for s in scheduled],
            [self.requests[s.req_id].block_ids for s in scheduled],
            self.config.block_size,
            self.device,
        )
        input_embeds, embeds_mask = self._gather_embeds(embeds_pieces, len(input_ids))
        input_ids_t = to_device(input_ids, self.device, torch.long)
        fed_tokens = self._fed_tokens(fed)
        if fed_tokens is not None:
            index, tokens = fed_tokens
            input_ids_t[index] = tokens
        return StepInputs(
            input_ids=input_ids_t,
            attn_metadata=attn_metadata,
            input_embeds=input_embeds,
            embeds_mask=embeds_mask,
            sample_rows=to_device(sample_rows, self.device, torch.long),
        )

    def _gather_embeds(self, pieces: list[EmbedsPiece], num_rows: int):
        """Scatters the prompt-embedding rows of this step into an [N, hidden] tensor and
        its row mask; no mask when they are every row (a step of embeddings prefills only,
        the first token's usual step), and no copy when one piece is the step. The other
        rows (token ids: a decode, a prompt of ids, a mixed prompt's ids) read the model's
        token embeddings."""
        if not pieces:
            return None, None
        if sum(rows.shape[0] for _, rows in pieces) == num_rows:  # disjoint: every row
            if len(pieces) == 1:
                return pieces[0][1], None
            return torch.cat([rows for _, rows in pieces]), None
        hidden = self.config.model_config.hidden_size
        embeds = torch.zeros(num_rows, hidden, dtype=self.config.torch_dtype, device=self.device)
        mask = torch.zeros(num_rows, dtype=torch.bool, device=self.device)
        for first_row, rows in pieces:
            embeds[first_row : first_row + rows.shape[0]] = rows
            mask[first_row : first_row + rows.shape[0]] = True
        return embeds, mask
