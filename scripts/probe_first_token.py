"""Time to the first token of one prompt (or --num-prompts of them, in one call) through
the offline engine (Ray included, no HTTP): the median of `LLM.generate(max_tokens=1)` (or
--max-tokens, with ignore_eos) over
repeats, for the prompts as token ids and as `prompt_embeds` (random rows of the model's
hidden size), interleaved so neither always follows the other. Also the driver's own share
of an embeddings request: the one put of its array (`ray.put` and, with prefix caching, the
rows' block digests, made there for a put of up to 1 MiB).

    python scripts/probe_first_token.py -tp 2 --repeats 40
    SHARDSERVE_USE_SHM_PLANS=0 python scripts/probe_first_token.py -tp 2   # plans over gloo
    python scripts/probe_first_token.py -tp 2 --timeline   # when each rank reaches each phase
    python scripts/probe_first_token.py --model-shape llama-3.1-8b --load-format dummy \
        --dtype bfloat16 --prompt-len 256 --num-prompts 16 --enable-prefix-caching --timeline

With --num-prompts N > 1 each timeline cell is a phase's first entry -> its last exit (the
first group of prompts in, the last out); after the table, the driver's time in each of its
phases summed over the call's prompts (the rows' check, within parsing, counted apart), and
rank 0's calls and time in each of its phases (with --max-tokens N, its decode steps too).
--steps prints rank 0's steps of a call one by one (median of repeats, per kind): the rows
each computed, the host's time in execute(), the device's time between events recorded
around it, and the period from its start to the next step's; then when each kind's first
step began after the call. --fresh-rows makes new embeddings tensors for every call, as
bench_offline.py does, instead of giving the same ones each time.
--enable-prefix-caching keeps the engine's cache
(its default) and salts every call's prompts apart, so nothing hits but every prompt is
hashed, as bench_offline.py does. The rows are given in the model's dtype, as
bench_offline.py gives them (--embeds-dtype float32: as a float32 model's embeddings come,
cast by the driver's check).

Without --model-shape / --model it runs the built-in default model (CPU works)."""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import ray
import torch

from cluster import LLM, SamplingParams
from cluster import prompts as prompt_parsing
from scripts.bench_args import UNCACHED, add_model_args, init_ray, model_path
from scripts.step_events import LeaderSteps, print_steps


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--num-prompts", type=int, default=1, help="prompts per generate() call")
    parser.add_argument("--max-tokens", type=int, default=1,
                        help="tokens each prompt generates (more than 1: the call's time covers its decode steps too)")
    parser.add_argument("--embeds-dtype", choices=["model", "float32"], default="model",
                        help="the rows' dtype as given to generate(): the model's, or float32 (each prompt "
                             "then cast in the driver's check)")
    parser.add_argument("--enable-prefix-caching", action="store_true",
                        help="keep the prefix cache, every call salted so nothing hits")
    parser.add_argument("--timeline", action="store_true",
                        help="also print, per rank, the median time from the driver's call to each phase")
    parser.add_argument("--fresh-rows", action="store_true",
                        help="new embeddings tensors for each call, as bench_offline.py makes them, instead of "
                             "the same ones every call")
    parser.add_argument("--steps", action="store_true",
                        help="also print rank 0's steps of a call one by one: rows, host and device ms, period")
    return parser.parse_args(argv)


def _stamp(obj, name: str, phase: str, stamps: list) -> None:
    """Wraps obj.name so that each call appends (phase, enter, exit) wall-clock times to
    stamps (time.time(): one clock for every process of a host)."""
    fn = getattr(obj, name)

    def stamped(*args, **kwargs):
        start = time.time()
        try:
            return fn(*args, **kwargs)
        finally:
            stamps.append((phase, start, time.time()))
    setattr(obj, name, stamped)


def _install_stamps(shard) -> bool:
    """On the shard: stamps the first-token path's phases into shard._stamps. add_requests
    itself cannot be wrapped (Ray calls the class's function), but its first act is
    _upload_call (on CUDA, the call's rows uploaded together), then _fetch_embeds for each
    request, for both kinds of prompt."""
    stamps = shard._stamps = []
    _stamp(shard, "_upload_call", "add_request (upload rows)", stamps)
    _stamp(shard, "_fetch_embeds", "add_request (fetch embeds)", stamps)
    _stamp(shard.intake, "put", "intake put", stamps)
    _stamp(shard.runner.pg, "broadcast_object", "plan broadcast", stamps)
    _stamp(shard.runner, "apply", "apply plan", stamps)
    _stamp(shard.runner, "execute", "execute", stamps)
    if shard.leader is not None:
        _stamp(shard.leader, "add_requests", "leader add", stamps)
        _stamp(shard.leader.sampler, "launch", "sampler launch", stamps)
        _stamp(shard.leader.outbox, "put", "outbox put", stamps)
        _stamp(shard.leader, "_await_digests", "await digests (idle)", stamps)
    return True


def _stamp_driver(llm, stamps: list) -> None:
    """The driver's phases of a request: parsing the prompt (its rows' check within), its
    length against max_model_len, putting embeddings into the object store (their digests
    made there too, for a put of up to 1 MiB with prefix caching), sending add_request to
    every shard."""
    _stamp(llm, "_parse", "parse prompt", stamps)
    _stamp(prompt_parsing, "validate_prompt_embeds", "check rows", stamps)  # main() unwraps it
    _stamp(llm, "_checked", "check length", stamps)
    _stamp(llm.engine, "put_prompts", "put embeds", stamps)
    _stamp(llm.engine, "add_request", "send add_request", stamps)


def _take_stamps(shard) -> list:
    stamps, shard._stamps[:] = list(shard._stamps), []
    return stamps


def _first_after(stamps: list, start: float, until_last: bool = False) -> dict:
    """phase -> (enter, exit) in ms after start, of each phase's first call that ended
    after start (a follower's plan wait begins before the request exists); with
    until_last, the exit is that of the phase's last call."""
    first = {}
    for phase, enter, exit_ in sorted(stamps, key=lambda stamp: stamp[2]):
        if exit_ < start:
            continue
        if phase not in first:
            first[phase] = ((enter - start) * 1e3, (exit_ - start) * 1e3)
        elif until_last:
            first[phase] = (first[phase][0], (exit_ - start) * 1e3)
    return first


def _busy_ms(stamps: list, start: float) -> dict:
    """phase -> ms spent in its calls that ended after start, summed (a phase nested in
    another, as the rows' check in parsing, counts in both)."""
    return {phase: ms for phase, (_, ms) in _calls_and_ms(stamps, start).items()}


def _calls_and_ms(stamps: list, start: float) -> dict:
    """phase -> (its calls that ended after start, the ms they took, summed)."""
    calls: dict = {}
    for phase, enter, exit_ in stamps:
        if exit_ >= start:
            count, ms = calls.get(phase, (0, 0.0))
            calls[phase] = (count + 1, ms + (exit_ - enter) * 1e3)
    return calls


def _print_timeline(timeline: dict) -> None:
    """timeline: mode -> list over repeats of {(rank, phase): (enter, exit)}."""
    modes = list(timeline)

    def order(key) -> float:  # its median exit in the last mode that has it (prompt_embeds: every phase)
        for mode in reversed(modes):
            exits = [run[key][1] for run in timeline[mode] if key in run]
            if exits:
                return statistics.median(exits)
        return float("inf")

    keys = sorted({key for runs in timeline.values() for run in runs for key in run}, key=order)
    print("median ms after the driver's generate() call, enter -> exit")
    print(f"{'rank':>6} {'phase':<28}" + "".join(f"{mode:>22}" for mode in modes))
    for rank, phase in keys:
        cells = []
        for mode in modes:
            runs = [run[(rank, phase)] for run in timeline[mode] if (rank, phase) in run]
            cells.append(f"{statistics.median(r[0] for r in runs):9.2f} -> {statistics.median(r[1] for r in runs):7.2f}"
                         if runs else f"{'-':>20}")
        print(f"{rank:>6} {phase:<28}" + "".join(f"{cell:>22}" for cell in cells))


def main(argv=None) -> dict:
    args = parse_args(argv)
    init_ray()
    llm = LLM(model_path(args), tensor_parallel_size=args.tensor_parallel_size, load_format=args.load_format,
              dtype=args.dtype, max_model_len=args.max_model_len, enable_prompt_embeds=True,
              **({} if args.enable_prefix_caching else UNCACHED))
    calls = itertools.count()
    check_rows = prompt_parsing.validate_prompt_embeds  # the module's own, put back at the end

    def salted(batch: list[dict]) -> list[dict]:  # this call's own cache keys
        if not args.enable_prefix_caching:
            return batch
        salt = f"call-{next(calls)}"
        return [{**prompt, "cache_salt": salt} for prompt in batch]

    try:
        hidden = llm.config.model_config.hidden_size
        gen = torch.Generator().manual_seed(0)
        rows_dtype = llm.config.torch_dtype if args.embeds_dtype == "model" else torch.float32

        def new_rows() -> list[dict]:
            return [{"prompt_embeds": torch.randn(args.prompt_len, hidden, generator=gen).to(rows_dtype)}
                    for _ in range(args.num_prompts)]
        prompts = {"token ids": [{"prompt_token_ids": list(range(10 + i, 10 + i + args.prompt_len))}
                                 for i in range(args.num_prompts)],
                   "prompt_embeds": new_rows()}
        one_token = SamplingParams(temperature=0.0, max_tokens=1)
        timed_params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
        for batch in prompts.values():  # warm-up
            llm.generate(salted(batch + batch[:1]), one_token, use_tqdm=False)
        times = {mode: [] for mode in prompts}
        timeline = {mode: [] for mode in prompts}
        driver_busy = {mode: [] for mode in prompts}  # per repeat: phase -> ms summed over its calls
        leader_calls = {mode: [] for mode in prompts}  # per repeat: rank 0's phase -> (calls, ms summed)
        leader_steps = {mode: [] for mode in prompts}  # per repeat: rank 0's CallSteps
        shards = llm.engine.shards
        driver_stamps = []
        if args.timeline:
            ray.get([shard.__ray_call__.remote(_install_stamps) for shard in shards])
            _stamp_driver(llm, driver_stamps)
        leader = LeaderSteps(llm) if args.steps else None
        for i in range(args.repeats):
            if args.fresh_rows:  # new tensors each call, as bench_offline.py makes them (not timed)
                prompts["prompt_embeds"] = new_rows()
            for mode in (list(prompts) if i % 2 else list(reversed(prompts))):
                batch = salted(prompts[mode])
                wall_start, start = time.time(), time.perf_counter()
                llm.generate(batch, timed_params, use_tqdm=False)
                times[mode].append((time.perf_counter() - start) * 1e3)
                if leader is not None:
                    leader_steps[mode].append(leader.take(wall_start, wall_start + times[mode][-1] / 1e3))
                if args.timeline:
                    ranks = ray.get([shard.__ray_call__.remote(_take_stamps) for shard in shards])
                    ranks.insert(0, list(driver_stamps))
                    driver_busy[mode].append(_busy_ms(driver_stamps, wall_start))
                    leader_calls[mode].append(_calls_and_ms(ranks[1], wall_start))
                    driver_stamps.clear()
                    timeline[mode].append({(rank - 1 if rank else "driver", phase): span
                                           for rank, stamps in enumerate(ranks)
                                           for phase, span in _first_after(stamps, wall_start,
                                                                           args.num_prompts > 1).items()})
        puts = []
        for _ in range(args.repeats):
            parsed = llm._parse(prompts["prompt_embeds"][0])
            start = time.perf_counter()
            put = llm.engine.put_prompt(parsed)
            puts.append((time.perf_counter() - start) * 1e3)
            if isinstance(put.prompt_embeds.digests, ray.ObjectRef):  # the hasher's call ends before the next put
                ray.get(put.prompt_embeds.digests)
    finally:
        prompt_parsing.validate_prompt_embeds = check_rows
        llm.shutdown()
    result = {f"median {mode} (ms)": statistics.median(values) for mode, values in times.items()}
    result["ratio"] = result["median prompt_embeds (ms)"] / result["median token ids (ms)"]
    result["median put of the embeddings (ms)"] = statistics.median(puts)
    if args.timeline:
        _print_timeline(timeline)
        for mode, runs in driver_busy.items():
            phases = sorted({phase for run in runs for phase in run})
            print(f"driver, {mode}: ms in each phase, summed over its calls (median of repeats): "
                  + ", ".join(f"{phase} {statistics.median(run.get(phase, 0.0) for run in runs):.2f}"
                              for phase in phases))
        for mode, runs in leader_calls.items():
            phases = sorted({phase for run in runs for phase in run})
            print(f"rank 0, {mode}: calls / ms in each phase, summed (median of repeats): "
                  + ", ".join(f"{phase} {statistics.median(run.get(phase, (0, 0.0))[0] for run in runs):g} / "
                              f"{statistics.median(run.get(phase, (0, 0.0))[1] for run in runs):.2f}"
                              for phase in phases))
    if args.steps:
        print_steps(leader_steps)
    batch = f"{args.num_prompts} prompts of {args.prompt_len} rows" if args.num_prompts > 1 \
        else f"{args.prompt_len}-row prompt"
    cache = ", prefix cache on (salted calls)" if args.enable_prefix_caching else ""
    tokens = f", {args.max_tokens} tokens each" if args.max_tokens > 1 else ""
    print(f"TP={args.tensor_parallel_size}, {batch}{tokens}{cache}, {args.repeats} repeats: "
          + ", ".join(f"{key} {value:.3f}" for key, value in result.items()))
    return result


if __name__ == "__main__":
    main()
