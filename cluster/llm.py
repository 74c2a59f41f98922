"""The offline API: `LLM(model, tensor_parallel_size=N, enable_prompt_embeds=True)
.generate(prompts, sampling_params)`, prompts being text, token ids or prompt embeddings
in any mix; `.chat(messages, sampling_params)` for conversations. Runs on the driver; the engine's shards are Ray actors."""

from __future__ import annotations

import dataclasses
import os
import queue
import time
from collections.abc import Sequence

import numpy as np
import ray
from tqdm.auto import tqdm

from cluster.engine_args import EngineArgs
from cluster.engine_client import EngineClient, request_error
from cluster.outputs import CompletionTracker, RequestMetrics, RequestOutput
from cluster.prompts import (EnginePrompt, check_length, check_prompt_logprobs, concat_rows, mixed_prompt,
                             parse_engine_prompt, truncate_prompt, truncation_length, validate_prompt_embeds)
from cluster.tokenizer import chat_prompt
from workers.sampling_params import SamplingParams

# generate() sends its prompts in groups of about one step's tokens (step_groups), each
# group's embeddings put into the object store as one object of at most this many bytes.
EMBEDS_GROUP_MAX_BYTES = 64 << 20
# The first group is this share of a step's tokens: the engine's first step starts as soon as
# it is checked, put and sent, and the next groups are read and put while the GPU works.
FIRST_GROUP_SHARE = 0.25


@dataclasses.dataclass
class _Batch:
    """One generate() call's requests as they run: outputs in input order, each sample's
    tracker by request id, the samples still running per prompt (by position), and the
    bytes of embeddings the unfinished prompts hold in the engine."""

    deltas: queue.SimpleQueue
    progress: tqdm
    outputs: list[RequestOutput] = dataclasses.field(default_factory=list)
    trackers: dict[str, tuple[int, CompletionTracker]] = dataclasses.field(default_factory=dict)
    running: dict[int, int] = dataclasses.field(default_factory=dict)
    embeds_of: dict[int, int] = dataclasses.field(default_factory=dict)
    embeds_in_flight: int = 0


class LLM:
    """A tensor-parallel engine on Ray for offline batch inference.

    `LLM()` with no model uses the built-in tiny default model. Starts a local Ray if
    none is running; `shutdown()` (or leaving a `with` block) frees the shard actors."""

    def __init__(self, model: str | None = None, **kwargs):
        self.engine_args = EngineArgs(model=model, **kwargs)
        if not ray.is_initialized():
            ray.init(log_to_driver=False)
        self.config, self.tokenizer = self.engine_args.resolve()
        self.engine = EngineClient(self.config)

    def get_tokenizer(self):
        return self.tokenizer

    def generate(
        self,
        prompts,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Results in input order. Prompts are checked as they are sent, a step's worth
        at a time, so the first step starts while later prompts are still read, as vLLM's
        generate() adds each as it checks it: a bad prompt or parameter raises ValueError
        and aborts the requests sent before it, and the LLM stays usable. A request that
        fails in the engine raises RequestFailedError (the engine lives) or
        EngineDeadError (it died)."""
        prompts = list(prompts) if isinstance(prompts, (list, tuple)) else [prompts]
        return self._generate(prompts, self._parse, sampling_params, use_tqdm)

    def _generate(self, prompts: list, parse, sampling_params, use_tqdm: bool) -> list[RequestOutput]:
        """`parse` makes each of `prompts` an EnginePrompt, when its group is sent."""
        params = self._per_prompt_params(sampling_params, len(prompts))
        for sp in params:
            sp.check_vocab(self.config.model_config.vocab_size)
        checked = (self._checked(parse(prompt), sp) for prompt, sp in zip(prompts, params))
        return self._run(checked, len(prompts), use_tqdm)

    def _checked(self, prompt: EnginePrompt, sp: SamplingParams) -> tuple[EnginePrompt, SamplingParams]:
        """The prompt truncated as `sp` asks, and `sp` with the max_tokens its length leaves."""
        max_model_len = self.config.max_model_len
        prompt = truncate_prompt(prompt, truncation_length(sp.truncate_prompt_tokens, max_model_len))
        check_prompt_logprobs(prompt, sp)
        return prompt, dataclasses.replace(sp, max_tokens=check_length(prompt.num_tokens, sp.max_tokens, max_model_len))

    def chat(
        self,
        messages,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: dict | None = None,
    ) -> list[RequestOutput]:
        """As vLLM's: one conversation (a list of {"role", "content"} messages) or a list of
        them, each rendered by the model's chat template, then generated as generate()
        does; a result per conversation, in order. A content may be a list of parts:
        {"type": "text", "text": ...} and, with enable_prompt_embeds, {"type":
        "prompt_embeds", "prompt_embeds": (seq_len, hidden_size) tensor}, whose rows take
        the part's place among the template's tokens."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        template = {"add_generation_prompt": add_generation_prompt, "continue_final_message": continue_final_message,
                    "chat_template_kwargs": chat_template_kwargs}
        return self._generate(conversations, lambda c: self._chat_prompt(c, template), sampling_params, use_tqdm)

    def _chat_prompt(self, conversation: list[dict], template: dict) -> EnginePrompt:
        model = self.config.model_config
        rows = [part.get("prompt_embeds") for message in conversation if isinstance(message.get("content"), list)
                for part in message["content"] if isinstance(part, dict) and part.get("type") == "prompt_embeds"]
        if rows and not self.config.enable_prompt_embeds:
            raise ValueError("prompt_embeds parts given but prompt embeddings are disabled; pass enable_prompt_embeds=True")
        rows = [validate_prompt_embeds(r, model.hidden_size, self.config.torch_dtype) for r in rows]
        token_ids, spans = chat_prompt(self.tokenizer, conversation, [r.shape[0] for r in rows], **template)
        if not rows:
            return EnginePrompt(None, tuple(token_ids), None)
        return mixed_prompt(tuple(token_ids), concat_rows(rows), spans, model.hidden_size, self.config.torch_dtype)

    def _parse(self, prompt) -> EnginePrompt:
        return parse_engine_prompt(prompt, self.config, self.tokenizer)

    @staticmethod
    def _per_prompt_params(sampling_params, num_prompts: int) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams()] * num_prompts
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * num_prompts
        sampling_params = list(sampling_params)
        if len(sampling_params) != num_prompts:
            raise ValueError(
                f"got {len(sampling_params)} sampling_params for {num_prompts} prompts; "
                "pass one, or one per prompt"
            )
        return sampling_params

    def _run(self, checked, num_prompts: int, use_tqdm: bool) -> list[RequestOutput]:
        batch = _Batch(queue.SimpleQueue(), tqdm(total=num_prompts, desc="Processed prompts", disable=not use_tqdm))
        try:  # a failure while adding (a later prompt's check or put, Ctrl-C) stops those already added
            with batch.progress:
                for group in step_groups(checked, self.config.max_num_batched_tokens):
                    nbytes = sum(embeds_nbytes(prompt) for prompt, _ in group)
                    # Each shard holds a running or waiting prompt's rows on its device: past
                    # the engine's bound, the next group waits for prompts to finish.
                    while (batch.embeds_in_flight
                           and batch.embeds_in_flight + nbytes > self.engine.max_embeds_in_flight_bytes):
                        self._take_delta(batch)
                    self._add_group(group, batch)
                while batch.running:
                    self._take_delta(batch)
        except BaseException:
            for req_id, (_, tracker) in batch.trackers.items():
                if not tracker.is_finished:
                    self.engine.abort(req_id)
            raise
        outputs = batch.outputs
        for position, tracker in batch.trackers.values():
            outputs[position].outputs.append(tracker.output())
            if outputs[position].prompt_logprobs is None:  # each sample's are the same
                outputs[position].prompt_logprobs = tracker.prompt_logprobs
            if outputs[position].num_cached_tokens is None:  # the first sample's
                outputs[position].num_cached_tokens = tracker.num_cached_tokens
        for output in outputs:
            output.finished = True
        return outputs

    def _add_group(self, group: list[tuple[EnginePrompt, SamplingParams]], batch: _Batch) -> None:
        """Adds each (prompt, params)'s samples to the engine, the group's embeddings put
        as one object and its requests sent together."""
        arrival_time = time.time()
        prompts = self.engine.put_prompts([prompt for prompt, _ in group])  # embeddings: once, for all samples
        with self.engine.together():
            for prompt, (parsed, sp) in zip(prompts, group):
                self._add_prompt(prompt, sp, arrival_time, batch, embeds_nbytes(parsed))

    def _add_prompt(self, prompt: EnginePrompt, sp: SamplingParams, arrival_time: float, batch: _Batch,
                    nbytes: int) -> None:
        """Each sample is tracked before it is added (an abort of an id the engine never
        took does nothing)."""
        request_id = self.engine.next_request_id()
        batch.outputs.append(RequestOutput(
            request_id, prompt.prompt, list(prompt.prompt_token_ids) if prompt.prompt_token_ids else None,
            prompt.num_tokens, metrics=RequestMetrics(arrival_time=arrival_time),
        ))
        position = len(batch.outputs) - 1
        batch.running[position] = sp.n
        batch.embeds_of[position] = nbytes
        batch.embeds_in_flight += nbytes
        for index in range(sp.n):
            req_id = f"{request_id}-{index}" if sp.n > 1 else request_id
            sample_params = sp.for_sample(index)
            batch.trackers[req_id] = (position, CompletionTracker(
                index, self.tokenizer, prompt.prompt_token_ids, sample_params))
            self.engine.add_request(
                req_id, sample_params, batch.deltas.put, prompt.prompt_token_ids, prompt.prompt_embeds,
                cache_salt=prompt.cache_salt, embeds_spans=prompt.embeds_spans,
            )

    def _take_delta(self, batch: _Batch) -> None:
        """Waits for the engine's next delta and applies it to its sample; a prompt whose
        samples have all finished leaves `batch.running` (and its embeddings the bytes in
        flight). A sample that failed in the engine raises."""
        delta = batch.deltas.get()
        position, tracker = batch.trackers[delta.req_id]
        if tracker.is_finished:
            return
        output = batch.outputs[position]
        if delta.new_token_ids:
            output.metrics.last_token_time = time.time()
            if output.metrics.first_token_time is None:
                output.metrics.first_token_time = output.metrics.last_token_time
        tracker.apply(delta)
        if not tracker.is_finished:
            return
        if tracker.finish_reason == "error":
            raise request_error(self.engine, tracker.error)
        if delta.finish_reason is None:  # finished by a stop string on this side
            self.engine.abort(delta.req_id)
        batch.running[position] -= 1
        if batch.running[position] == 0:
            del batch.running[position]
            batch.embeds_in_flight -= batch.embeds_of.pop(position)
            output.metrics.finished_time = time.time()
            batch.progress.update(1)

    def start_profile(self) -> None:
        """Profiles every shard (torch.profiler: CPU ops of all its threads, and CUDA
        kernels on GPU) until stop_profile(), as vLLM's LLM.start_profile."""
        self.engine.start_profile()

    def stop_profile(self, directory: str | None = None) -> list[str]:
        """Writes each shard's trace (rank<r>.json, for Perfetto or chrome://tracing) and
        op table (rank<r>.txt) into `directory` (default: $SHARDSERVE_TORCH_PROFILER_DIR,
        else ./shardserve-profile) on the shard's node; returns the paths."""
        directory = directory or os.environ.get("SHARDSERVE_TORCH_PROFILER_DIR", "shardserve-profile")
        return self.engine.stop_profile(os.path.abspath(directory))

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def embeds_nbytes(prompt: EnginePrompt) -> int:
    """Bytes of a checked prompt's embeddings array (0 for token ids)."""
    return prompt.prompt_embeds.nbytes if isinstance(prompt.prompt_embeds, np.ndarray) else 0


def step_groups(checked, step_tokens: int):
    """Consecutive runs of (prompt, params), taken from `checked` as they are needed, each
    about one engine step's worth: a run ends once its prompts' tokens, times their
    samples, reach `step_tokens` (FIRST_GROUP_SHARE of it for the first run), or its
    embeddings arrays EMBEDS_GROUP_MAX_BYTES. generate() puts a run's embeddings as one
    object and sends its requests together, so the first step starts once the first, small
    run is sent, and later runs are read and put while the engine works."""
    group, tokens, nbytes = [], 0, 0
    run_tokens = max(1, int(step_tokens * FIRST_GROUP_SHARE))
    for prompt, sp in checked:
        group.append((prompt, sp))
        tokens += prompt.num_tokens * sp.n
        nbytes += embeds_nbytes(prompt)
        if tokens >= run_tokens or nbytes >= EMBEDS_GROUP_MAX_BYTES:
            yield group
            group, tokens, nbytes, run_tokens = [], 0, 0, step_tokens
    if group:
        yield group
