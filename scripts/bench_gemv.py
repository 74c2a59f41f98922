"""Micro-benchmark: the Triton GEMV of workers/kernels/gemv.py against F.linear, one GPU.

    python scripts/bench_gemv.py                 # default plans; meant to take < 1 min on an H200
    python scripts/bench_gemv.py --sweep         # also ~9 plans per shape (more compiles: ~2 min)
    python scripts/bench_gemv.py --rows 4 --dtype float16

Shapes: each shard's decode linears (qkv, o, gate_up, down, LM head) of Llama-3.1-8B at
TP 1 and 2, Llama-3.2-1B, and Llama-3.1-70B at TP 2.

Each time is one call's share of CALLS back-to-back calls captured in one CUDA graph and
replayed (launch overhead excluded; best of a few timings). The calls rotate over copies of
the weight that together outgrow the L2 cache, so every call reads its weight from HBM.
TB/s counts the weight, input and output bytes once; the device's copy bandwidth (read +
write of a large copy, timed the same way) is printed as the roofline. Down projections
also run with SiLU-and-mul fused in, against the elementwise kernel then F.linear."""

from __future__ import annotations

import argparse
import dataclasses
import sys

import torch
import torch.nn.functional as F

from workers.kernels import elementwise, gemv

CALLS = 20  # calls per captured graph
REPLAYS = 5  # graph replays per timing
TIMINGS = 3  # timings per measurement; the best is kept
ROTATE_BYTES = 256 << 20  # weight copies per shape add up to at least this (L2 is ~50 MB)

# hidden, intermediate, heads, KV heads, head_dim, vocab
MODELS = {
    "1B": (2048, 8192, 32, 8, 64, 128256),
    "8B": (4096, 14336, 32, 8, 128, 128256),
    "70B": (8192, 28672, 64, 8, 128, 128256),
}
RUNS = [("8B", 1), ("8B", 2), ("1B", 1), ("70B", 2)]  # (model, tensor-parallel size)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1, help=f"batch rows M, 1 to {gemv.MAX_ROWS}")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--sweep", action="store_true", help="also time a few other plans per shape")
    args = parser.parse_args()
    if not 1 <= args.rows <= gemv.MAX_ROWS:
        parser.error(f"--rows must be between 1 and {gemv.MAX_ROWS}, got {args.rows}")
    return args


def linears(model: str, tp: int) -> list[tuple[str, int, int]]:
    """(name, N, K) of one shard's decode linears: column-parallel split N, row-parallel K."""
    hidden, inter, heads, kv_heads, head_dim, vocab = MODELS[model]
    return [
        ("qkv", (heads + 2 * kv_heads) * head_dim // tp, hidden),
        ("o", hidden, heads * head_dim // tp),
        ("gate_up", 2 * inter // tp, hidden),
        ("down", hidden, inter // tp),
        ("lm_head", vocab // tp, hidden),
    ]


def time_per_call(call) -> float:
    """Seconds per call(i), i < CALLS, all captured in one CUDA graph and replayed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside capture: compiles, cuBLAS workspace
        for i in range(CALLS):
            call(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(CALLS):
            call(i)
    graph.replay()
    best = float("inf")
    for _ in range(TIMINGS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(REPLAYS):
            graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3 / (CALLS * REPLAYS))
    del graph
    return best


def copy_bandwidth(num_bytes: int = 1 << 30) -> float:
    """Bytes per second read + written by a large device-to-device copy."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    seconds = time_per_call(lambda i: dst.copy_(src))
    return 2 * num_bytes / seconds


@dataclasses.dataclass
class Case:
    """One shape's tensors: weights [copies, N, K] rotated over, x [M, K or 2K]."""

    label: str
    weights: torch.Tensor
    x: torch.Tensor
    silu_and_mul: bool

    def weight(self, i: int) -> torch.Tensor:
        return self.weights[i % self.weights.shape[0]]

    def num_bytes(self) -> int:
        _, n, k = self.weights.shape
        return (n * k + self.x.numel() + self.x.shape[0] * n) * self.x.element_size()

    def reference(self, i: int) -> torch.Tensor:
        x = elementwise.silu_and_mul(self.x) if self.silu_and_mul else self.x
        return F.linear(x, self.weight(i))

    def kernel(self, i: int, plan: gemv.GemvPlan | None = None) -> torch.Tensor:
        return gemv.gemv(self.x, self.weight(i), silu_and_mul=self.silu_and_mul, plan=plan)


def make_case(label: str, n: int, k: int, rows: int, dtype: torch.dtype, silu_and_mul: bool) -> Case:
    copies = min(CALLS, -(-ROTATE_BYTES // (n * k * dtype.itemsize)))
    weights = torch.randn(copies, n, k, device="cuda", dtype=dtype) / k**0.5
    x = torch.randn(rows, 2 * k if silu_and_mul else k, device="cuda", dtype=dtype)
    return Case(label, weights, x, silu_and_mul)


def check(case: Case) -> str:
    """'ok' when the kernel matches F.linear in float32 to one rounding to the dtype."""
    x = elementwise.silu_and_mul(case.x) if case.silu_and_mul else case.x
    expected = F.linear(x.float(), case.weight(0).float()).to(x.dtype).float()
    out = case.kernel(0).float()
    rtol = 2**-7 if case.x.dtype == torch.bfloat16 else 2**-10
    bad = ((out - expected).abs() > 1e-3 + rtol * expected.abs()).sum().item()
    return "ok" if bad == 0 else f"{bad} WRONG"


def candidate_plans(rows: int, n: int, k: int) -> list[gemv.GemvPlan]:
    """plan_for's plan and its neighbours: splits, tile sizes, warps, pipelining, unrolling."""
    base = gemv.plan_for(rows, n, k, torch.cuda.get_device_properties(0).multi_processor_count)
    variants = [
        dict(num_splits=1), dict(num_splits=2 * base.num_splits),
        dict(block_n=2 * base.block_n), dict(block_n=max(1, base.block_n // 2)),
        dict(block_k=2 * base.block_k), dict(block_k=2 * base.block_k, num_warps=2 * base.num_warps),
        dict(num_stages=3), dict(unroll=2),
    ]
    return list(dict.fromkeys([base] + [dataclasses.replace(base, **v) for v in variants]))


def describe(plan: gemv.GemvPlan) -> str:
    """A plan in a few characters: n8 k1024 s2 w4 (+ st3 for stages, u2 for unrolling)."""
    text = f"n{plan.block_n} k{plan.block_k} s{plan.num_splits} w{plan.num_warps}"
    text += f" st{plan.num_stages}" if plan.num_stages > 1 else ""
    return text + (f" u{plan.unroll}" if plan.unroll > 1 else "")


def best_plan(case: Case) -> str:
    """The fastest of candidate_plans for this case, with its time and bandwidth."""
    _, n, k = case.weights.shape
    plans = candidate_plans(case.x.shape[0], n, k)
    seconds, plan = min(((time_per_call(lambda i, p=p: case.kernel(i, p)), p) for p in plans), key=lambda t: t[0])
    return f"  best {describe(plan)}: {seconds * 1e6:.2f} us, {case.num_bytes() / seconds / 1e12:.2f} TB/s"


def report(case: Case, sweep: bool) -> None:
    torch_s, gemv_s = time_per_call(case.reference), time_per_call(case.kernel)
    num_bytes = case.num_bytes()
    _, n, k = case.weights.shape
    plan = gemv.plan_for(case.x.shape[0], n, k, torch.cuda.get_device_properties(0).multi_processor_count)
    line = (f"{case.label:<34} {num_bytes / 1e6:8.1f} {torch_s * 1e6:9.2f} {num_bytes / torch_s / 1e12:6.2f} "
            f"{gemv_s * 1e6:9.2f} {num_bytes / gemv_s / 1e12:6.2f} {torch_s / gemv_s:7.2f}x  {check(case):<5} "
            f"{describe(plan)}")
    print(line + (best_plan(case) if sweep else ""), flush=True)


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available() or gemv.triton is None:
        sys.exit("bench_gemv.py needs a CUDA GPU and Triton; this machine has "
                 f"{'no CUDA device' if not torch.cuda.is_available() else 'no Triton'}.")
    dtype = getattr(torch, args.dtype)
    name = torch.cuda.get_device_name()
    print(f"{name}: copy bandwidth {copy_bandwidth() / 1e12:.2f} TB/s (read + write); M={args.rows} {args.dtype}")
    print(f"{'shape (N x K)':<34} {'MB':>8} {'torch us':>9} {'TB/s':>6} {'gemv us':>9} {'TB/s':>6} "
          f"{'speedup':>8}  check plan")
    for model, tp in RUNS:
        for layer, n, k in linears(model, tp):
            for fused in (False, True) if layer == "down" else (False,):
                label = f"{model} TP{tp} {layer}{' +silu' if fused else ''} {n}x{k}"
                case = make_case(label, n, k, args.rows, dtype, fused)
                report(case, args.sweep)
                del case
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
