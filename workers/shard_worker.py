"""ShardWorker: one tensor-parallel rank, run as a threaded Ray actor (cluster/ wraps it
with ray.remote). Ray places it, hands it requests and collects outputs; its step loop
runs on its own thread and talks to the other ranks only through torch.distributed."""

from __future__ import annotations

import dataclasses
import os
import socket
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from workers.config import EngineConfig
from workers.intake import Intake, RequestState
from workers.kernels.compile_watch import CompileWatch
from workers.messages import EngineStats, NewRequest, PromptEmbedsRef, RequestDelta
from workers.model_runner import ModelRunner
from workers.one_shot_all_reduce import try_one_shot_all_reduce
from workers.parallel import bind_store, init_process_group
from workers.request import Request
from workers.shm_channel import SPIN_S, try_shm_channel
from workers.step_loop import CLIENT_TIMEOUT_S, OWNER_CLIENT, LeaderLoop, UnknownClientError, run_follower
from workers.transfer import UPLOAD_THREADS, to_device, upload_rows


def _all_threads_config():
    """Kineto records the ops of every thread, not only the one that started it."""
    from torch._C._profiler import _ExperimentalConfig

    try:
        return _ExperimentalConfig(profile_all_threads=True)
    except TypeError as exc:  # a PyTorch without the option
        raise RuntimeError(f"this PyTorch ({torch.__version__}) cannot profile the step-loop thread") from exc


def assigned_cuda_index() -> int:
    """The CUDA index of the GPU Ray gave this actor. The shard sees every GPU of its host
    (cluster/placement.py sets NOSET_CUDA_VISIBLE_DEVICES), so Ray's GPU id is looked up in
    CUDA_VISIBLE_DEVICES as the node set it; where Ray narrowed it to the one GPU anyway,
    that is index 0."""
    import ray

    gpu_ids = ray.get_runtime_context().get_accelerator_ids().get("GPU", [])
    if len(gpu_ids) != 1:
        raise RuntimeError(f"a shard takes exactly one GPU, Ray assigned {gpu_ids}")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return int(gpu_ids[0])
    visible = [entry.strip() for entry in visible.split(",")]
    if gpu_ids[0] not in visible:
        raise RuntimeError(f"Ray assigned GPU {gpu_ids[0]}, not in CUDA_VISIBLE_DEVICES={visible}")
    return visible.index(gpu_ids[0])


class ShardWorker:
    def __init__(self, config: EngineConfig, rank: int):
        # No CUDA calls here: the device is chosen in init(), after Ray set the env.
        self.config = config
        self.rank = rank
        self.intake = Intake()
        self._store = None
        self.runner: ModelRunner | None = None
        self.leader: LeaderLoop | None = None
        self._profiler = None
        self._profiler_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="profiler")
        self._upload_pool = None  # on CUDA: the threads of a call's embeddings rows' host copy
        self._compiles = CompileWatch()

    def node_ip(self) -> str:
        import ray

        return ray.util.get_node_ip_address()

    def rendezvous_address(self) -> tuple[str, int]:
        """Rank 0 binds the torch.distributed store on a port the OS picks."""
        host = self.node_ip()
        self._store = bind_store(host, self.config.tensor_parallel_size)
        return host, self._store.port

    def init(self, master_addr: str, master_port: int) -> tuple[int, int | None]:
        """Joins the process group, builds the model shard and its KV cache. Returns the
        number of KV blocks (equal on every rank) and the bytes of device memory still free
        once the cache, the graphs and the warm-up steps took theirs (None on CPU)."""
        device = self._select_device()
        if device.type == "cuda":
            self._compiles.install()
        pg = init_process_group(
            self.rank,
            self.config.tensor_parallel_size,
            master_addr,
            master_port,
            device.type,
            store=self._store,
        )
        if pg.world_size > 1:
            pg.object_channel = try_shm_channel(pg, spin_s=SPIN_S if device.type == "cuda" else 0.0)
        if device.type == "cuda" and pg.world_size > 1 and not self.config.disable_custom_all_reduce:
            pg.fast_all_reduce = try_one_shot_all_reduce(pg, device)
        torch.manual_seed(self.config.seed)
        self.runner = ModelRunner(self.config, pg, device)
        if pg.is_leader:
            self.leader = LeaderLoop(self.config, self.runner, pg, self.intake)
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
        return self.runner.num_blocks, free

    def _select_device(self) -> torch.device:
        if self.config.device == "cpu":
            return torch.device("cpu")
        device = torch.device("cuda", assigned_cuda_index())
        torch.cuda.set_device(device)
        return device

    def run(self) -> None:
        """Runs the step loop until shutdown. Called once; returns only at the end."""
        self._compiles.serving()  # graphs are captured: a kernel compiled now stalls a step
        if self.runner.device.type == "cuda":
            torch.cuda.set_device(self.runner.device)
        if self.leader is not None:
            self.leader.run()
        else:
            run_follower(self.runner, self.runner.pg, self.intake)

    def add_requests(self, news: list[NewRequest], embeds: np.ndarray | list[np.ndarray] | None = None,
                     digests: list | None = None, client: int = OWNER_CLIENT) -> list[Exception | None]:
        """Takes each request, in order, then hands those taken to the step loop together
        (so its next step does not begin with the first alone). `embeds`, resolved by Ray
        before the call (the engine client passes the ref as a top-level argument, and none
        inside a request), is their one embeddings array, or the list of several prompts'
        arrays that each request's PromptEmbedsRef.index points into. `digests` (the leader's,
        with prefix caching): [each prompt's block digests by the same index], or [the ref of
        the EmbedsHasher's answer for that object, such a list]; the scheduler waits for an
        answer when it first keys the prompt, not this call. Per request: None, or the error
        that kept this shard from taking it (the others are taken all the same; _take says
        what becomes of that one). `client`: the engine client whose outbox (on the leader)
        gets their deltas; one that is gone (UnknownClientError) has the leader take none
        of them, and the followers' copies are dropped with the next plan."""
        if self.leader is not None:
            try:
                self.leader.outbox.route([new.req_id for new in news], client)
            except UnknownClientError as exc:
                for new in news:
                    self.leader.discard(new.req_id)
                return [exc] * len(news)
        listed = _answer(digests[0]) if digests and self.leader is not None else None
        uploaded = self._upload_call(news, embeds)
        taken, errors = [], []
        for new in news:
            index = new.prompt_embeds.index if new.prompt_embeds is not None else None
            array = _array_at(embeds, index)
            keys = _item(listed, index or 0) if listed is not None and new.prompt_embeds is not None else None
            try:
                taken.append(self._take(new, uploaded.get(index, array), keys))
            except Exception as exc:  # noqa: BLE001 - the engine client fails this request
                errors.append(exc)
            else:
                errors.append(None)
        for state, _ in taken:
            self.intake.put(state)
        if self.leader is not None and taken:
            self.leader.add_requests([request for _, request in taken])
        return errors

    def _take(self, new: NewRequest, embeds_array: np.ndarray | None, digests: tuple | Future | None = None
              ) -> tuple[RequestState, Request | None]:
        """The request's mirror on this shard and, on the leader, its Request (`digests`: its
        rows' block digests, or their Future on their way from the hasher). If the leader
        cannot take the request, it is discarded on every shard (the followers' copies are
        dropped with the next plan), its error delta goes out with the next output poll,
        and the error is raised. If a follower cannot, it takes a stand-in (below) and
        raises; the engine client fails the request at the leader (fail(): aborted, and
        nothing it keyed shared)."""
        try:
            state = self._mirror(new, self._fetch_embeds(new.prompt_embeds, embeds_array))
            request = None
            if self.leader is not None:
                request = Request.from_new_request(
                    new, self.config.eos_token_ids, self.config.max_model_len, device=self.runner.device,
                    embeds_block_digests=digests)
        except Exception as exc:
            if self.leader is not None:
                self.leader.discard(new.req_id)
                self.leader.outbox.put([RequestDelta.not_taken(new.req_id, exc)])
            else:
                self.intake.put(self._stand_in(new))
            raise
        return state, request

    def _stand_in(self, new: NewRequest) -> RequestState:
        """A follower's copy of a request it could not take: the leader may schedule the
        request before the engine client's abort reaches it, and every rank must then run
        the same step (the same collectives, the same rows). Embeddings rows read as zeros
        (one row expanded: nothing allocated per row); the rows' outputs are garbage, but
        only that request's, and it is failed and aborted."""
        embeds = None
        if new.prompt_embeds is not None:
            hidden = self.config.model_config.hidden_size
            row = torch.zeros(1, hidden, dtype=self.config.torch_dtype, device=self.runner.device)
            embeds = row.expand(new.prompt_embeds.shape[0], hidden)
        state = self._mirror(new, embeds)
        state.stand_in = True
        return state

    @staticmethod
    def _mirror(new: NewRequest, prompt_embeds: torch.Tensor | None) -> RequestState:
        """This shard's mirror of the request, with its embeddings rows (if any) on the
        device; a mixed prompt's rows stay as they came, with the spans they go to."""
        token_ids = list(new.prompt_token_ids) if new.prompt_token_ids else None
        prompt_logprobs = new.sampling_params.prompt_logprobs if token_ids and prompt_embeds is None else None
        return RequestState(new.req_id, new.prompt_len, token_ids, prompt_embeds, new.embeds_spans,
                            prompt_logprobs=prompt_logprobs)

    def _upload_call(self, news: list[NewRequest], embeds) -> dict[int | None, torch.Tensor]:
        """On CUDA, each embeddings array the call's requests use (by their index; None:
        the call's one array), uploaded together by upload_rows: the host copy on the
        upload threads, not one prompt after another on this one. {} on CPU; {} too if an
        array is not what its request says or the upload fails (pinned memory short), so
        that each request's _take meets its own error."""
        if self.runner.device.type != "cuda" or embeds is None:
            return {}
        if self._upload_pool is None:
            self._upload_pool = ThreadPoolExecutor(max_workers=UPLOAD_THREADS, thread_name_prefix="shardserve-upload")
        refs = {new.prompt_embeds.index: new.prompt_embeds for new in news if new.prompt_embeds is not None}
        try:
            tensors = {index: _host_rows(ref, _array_at(embeds, index)) for index, ref in refs.items()}
            uploaded = upload_rows(list(tensors.values()), self.runner.device, self.config.torch_dtype,
                                   self._upload_pool)
        except Exception:  # noqa: BLE001 - each request's own _take raises it
            return {}
        return dict(zip(tensors, uploaded))

    def _fetch_embeds(self, embeds: PromptEmbedsRef | None, array: np.ndarray | torch.Tensor | None
                      ) -> torch.Tensor | None:
        """The request's (seq_len, hidden) array, a zero-copy read-only view of the object
        store, as a tensor in the model's dtype on this shard's device (a tensor there
        already, from _upload_call, as it is)."""
        if embeds is None:
            return None
        if isinstance(array, torch.Tensor) and array.device == self.runner.device:
            return array
        tensor = _host_rows(embeds, array)
        # One host copy (into pinned memory on CUDA) releases the object-store view; the
        # upload waits for no step.
        if self.runner.device.type == "cuda":
            return to_device(tensor.to(self.config.torch_dtype), self.runner.device)
        return tensor.to(self.config.torch_dtype, copy=True)

    def abort(self, req_id: str) -> None:
        self.leader.abort(req_id)

    def fail(self, req_id: str) -> None:
        """A request another shard could not take: aborted here, its cached K/V unshared."""
        self.leader.fail(req_id)

    def get_outputs(self, timeout_s: float = 1.0, step_timeout_s: float | None = None,
                    client: int = OWNER_CLIENT) -> list[RequestDelta]:
        """Long-poll: `client`'s deltas produced since its last call, waiting up to timeout_s.
        Raises StepTimeoutError once a step has run past step_timeout_s (the watchdog), and
        UnknownClientError for a client that is gone. Aborts the requests of attached clients
        that stopped polling (Outboxes.expire)."""
        self._abort_all(self.leader.outbox.expire())
        deltas = self.leader.outbox.take(timeout_s, client)
        if step_timeout_s is not None and not deltas:
            self.leader.check_progress(step_timeout_s)
        return deltas

    def attach_client(self, timeout_s: float = CLIENT_TIMEOUT_S) -> int:
        """Opens an outbox for an engine client that attaches to this running engine (an API
        server of its own); returns its id for add_requests and get_outputs. A client that
        does not poll for `timeout_s` is dropped and its requests aborted."""
        self._abort_all(self.leader.outbox.expire())
        return self.leader.outbox.attach(timeout_s)

    def detach_client(self, client: int) -> None:
        """Closes an attached client's outbox and aborts its requests still running."""
        self._abort_all(self.leader.outbox.detach(client))

    def clients(self) -> dict[int, int]:
        """The engine clients this leader serves (the owner's id first, then those attached
        and still polling), each with the number of requests it has sent."""
        self._abort_all(self.leader.outbox.expire())
        return self.leader.outbox.clients()

    def _abort_all(self, req_ids: list[str]) -> None:
        for req_id in req_ids:
            self.leader.abort(req_id)

    def stats(self) -> EngineStats:
        return dataclasses.replace(self.leader.stats(), num_kernel_compiles=self._compiles.num_compiles)

    def shutdown(self) -> None:
        if self.leader is not None:
            self.leader.stop()

    def start_profile(self) -> None:
        """torch.profiler over this process's threads (the step loop's included) and,
        on CUDA, the GPU's kernels, until stop_profile. Kineto needs one thread to start
        and stop it; actor calls may land on any of the actor's threads, so both run on
        a thread of the profiler's own."""
        from torch.profiler import ProfilerActivity, profile

        if self._profiler is not None:
            raise RuntimeError("a profile is already running on this shard")
        activities = [ProfilerActivity.CPU]
        if self.runner is not None and self.runner.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        self._profiler = profile(activities=activities, experimental_config=_all_threads_config())
        self._on_profiler_thread(self._profiler.start)

    def stop_profile(self, directory: str) -> list[str]:
        """Writes rank<r>.json (a Chrome / Perfetto trace) and rank<r>.txt (ops by self
        time) into `directory` on this shard's node; returns their paths."""
        if self._profiler is None:
            raise RuntimeError("no profile is running on this shard: call start_profile first")
        profiler, self._profiler = self._profiler, None
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        trace, table = folder / f"rank{self.rank}.json", folder / f"rank{self.rank}.txt"
        sort_by = "self_cuda_time_total" if self.runner.device.type == "cuda" else "self_cpu_time_total"

        def stop_and_write() -> None:
            profiler.stop()
            profiler.export_chrome_trace(str(trace))
            table.write_text(profiler.key_averages().table(sort_by=sort_by, row_limit=40))

        self._on_profiler_thread(stop_and_write)
        return [str(trace), str(table)]

    def _on_profiler_thread(self, fn) -> None:
        """fn() on the profiler's own thread, with this shard's GPU current there: the
        profiler synchronizes the current device, and a thread that never chose one is on
        GPU 0, another shard's (a shard sees every GPU of its host)."""
        def run() -> None:
            if self.runner is not None and self.runner.device.type == "cuda":
                torch.cuda.set_device(self.runner.device)
            fn()

        self._profiler_thread.submit(run).result()

    def pid(self) -> int:
        return os.getpid()

    def hostname(self) -> str:
        return socket.gethostname()


def _answer(digests) -> list | Future:
    """The prompts' digests as they came: made where the rows were put (a list), or a
    Future of the hasher's answer (from its reference)."""
    return digests if isinstance(digests, list) else digests.future()


def _item(listed: list | Future, index: int) -> tuple | Future:
    """The `index`th prompt's digests: of a list, the item; of a Future, a Future of the
    item of what it resolves to (its error, if it fails)."""
    if isinstance(listed, list):
        return listed[index]
    item: Future = Future()

    def pick(done: Future) -> None:
        try:
            item.set_result(done.result()[index])
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits for the item
            item.set_exception(exc)

    listed.add_done_callback(pick)
    return item


def _array_at(embeds, index: int | None):
    """A request's array in what its call brought: the `index`th of several prompts'
    arrays, or (index None) the call's one array, or None when the call brought none."""
    return embeds[index] if index is not None else embeds


def _host_rows(embeds: PromptEmbedsRef, array: np.ndarray | None) -> torch.Tensor:
    """A request's embeddings array (a read-only view of the object store) as a host
    tensor of the dtype the driver put it as, no copy made."""
    if array is None:
        raise ValueError("a request with prompt embeddings came without their array "
                         "(EngineClient passes it as the call's argument)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns on read-only arrays
        tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if embeds.dtype == "bfloat16" else tensor
