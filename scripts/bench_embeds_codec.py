"""Micro-benchmark: the server's safe decode of a `prompt_embeds` payload (strict base64,
the archive's pickle inspected opcode by opcode, the tensor built from its storage record,
then shape, dtype and NaN/Inf checks) against the naive decode that vLLM's docs show
(`torch.load(io.BytesIO(base64.b64decode(payload)), weights_only=True)`), measured in the
same run on the same payloads. Medians of --repeats; one CPU thread pool as configured.

    python scripts/bench_embeds_codec.py --shapes 64x256 128x4096 512x8192
    python scripts/bench_embeds_codec.py --shapes 128x4096 --parts   # JSON, base64 and the NaN check alone
    python scripts/bench_embeds_codec.py --shapes 128x4096 --threads 64 8 1   # the driver's check
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import time

import torch

from api.embeds_codec import decode_prompt_embeds, encode_prompt_embeds
from cluster.prompts import all_finite, validate_prompt_embeds


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["64x256", "128x4096", "512x8192"],
                        help="ROWSxHIDDEN of float32 payloads")
    parser.add_argument("--dtype", default="bfloat16", help="the model dtype the payload is cast to")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--parts", action="store_true",
                        help="also time three parts against what they replace: the request body's JSON parse "
                             "by pydantic_core and by the standard library, base64 by pybase64 and by the "
                             "standard library, and the NaN/Inf check by its bits (all_finite), by aminmax and by isfinite().all()")
    parser.add_argument("--threads", type=int, nargs="+", metavar="N",
                        help="also time the offline driver's cast and NaN/Inf check of a float32 tensor with torch "
                             "set to each N CPU threads: the bare ops, and validate_prompt_embeds (which runs them on "
                             "fewer threads for small tensors); each also after a 20 ms pause, as between requests")
    return parser.parse_args(argv)


def median_ms(fn, repeats: int, pause_s: float = 0.0) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if pause_s:
            time.sleep(pause_s)
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def random_rows(shape: str) -> torch.Tensor:
    """The float32 (rows, hidden) tensor a "ROWSxHIDDEN" shape names, the same every run."""
    num_rows, hidden = (int(part) for part in shape.split("x"))
    return torch.randn(num_rows, hidden, generator=torch.Generator().manual_seed(0))


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    dtype = getattr(torch, args.dtype)
    rows = []
    print(f"{'shape':>12} {'payload MB':>10} {'naive ms':>9} {'safe ms':>8} {'safe / naive':>12}")
    for shape in args.shapes:
        tensor = random_rows(shape)
        hidden, payload = tensor.shape[1], encode_prompt_embeds(tensor)

        def naive():
            tensor = torch.load(io.BytesIO(base64.b64decode(payload)), weights_only=True)
            return tensor.to(dtype)

        def safe():
            return decode_prompt_embeds(payload, hidden_size=hidden, dtype=dtype, max_bytes=len(payload))

        assert torch.equal(naive(), safe())
        row = {"shape": shape, "payload_mb": len(payload) / 1e6,
               "naive_ms": median_ms(naive, args.repeats), "safe_ms": median_ms(safe, args.repeats)}
        row["ratio"] = row["safe_ms"] / row["naive_ms"]
        rows.append(row)
        print(f"{shape:>12} {row['payload_mb']:>10.2f} {row['naive_ms']:>9.3f} {row['safe_ms']:>8.3f} "
              f"{row['ratio']:>11.2f}x")
    if args.parts:
        rows.extend(time_parts(args.shapes, dtype, args.repeats))
    if args.threads:
        rows.extend(time_threads(args.shapes, dtype, args.repeats, args.threads))
    return rows


def time_parts(shapes: list[str], dtype: torch.dtype, repeats: int) -> list[dict]:
    import pybase64
    import pydantic_core

    parts = []
    print(f"{'shape':>12} {'body MB':>7} {'json.loads ms':>13} {'from_json ms':>12} {'b64 stdlib ms':>13} "
          f"{'pybase64 ms':>11} {'isfinite ms':>11} {'aminmax ms':>10} {'bits ms':>7}")
    for shape in shapes:
        tensor = random_rows(shape)
        payload, cast = encode_prompt_embeds(tensor), tensor.to(dtype)
        body = json.dumps({"model": "m", "prompt": "", "prompt_embeds": payload, "max_tokens": 16}).encode()
        row = {"shape": shape, "body_mb": len(body) / 1e6,
               "json_stdlib_ms": median_ms(lambda: json.loads(body), repeats),
               "from_json_ms": median_ms(lambda: pydantic_core.from_json(body, cache_strings="keys"), repeats),
               "b64_stdlib_ms": median_ms(lambda: base64.b64decode(payload, validate=True), repeats),
               "pybase64_ms": median_ms(lambda: pybase64.b64decode(payload, validate=True), repeats),
               "isfinite_ms": median_ms(lambda: bool(torch.isfinite(cast).all()), repeats),
               "aminmax_ms": median_ms(lambda: bool(torch.isfinite(torch.stack(torch.aminmax(cast))).all()),
                                       repeats),
               "bits_ms": median_ms(lambda: all_finite(cast), repeats)}
        parts.append(row)
        print(f"{shape:>12} {row['body_mb']:>7.2f} {row['json_stdlib_ms']:>13.3f} {row['from_json_ms']:>12.3f} "
              f"{row['b64_stdlib_ms']:>13.3f} {row['pybase64_ms']:>11.3f} {row['isfinite_ms']:>11.3f} "
              f"{row['aminmax_ms']:>10.3f} {row['bits_ms']:>7.3f}")
    return parts


def time_threads(shapes: list[str], dtype: torch.dtype, repeats: int, thread_counts: list[int]) -> list[dict]:
    before = torch.get_num_threads()
    rows = []
    print(f"{'shape':>12} {'threads':>7} {'bare ms':>8} {'after pause':>11} {'checked ms':>10} {'after pause':>11}")
    try:
        for shape in shapes:
            tensor = random_rows(shape)
            hidden = tensor.shape[1]

            def bare():  # the driver's cast and check, without validate_prompt_embeds' bound on threads
                return all_finite(tensor.to(dtype))

            def checked():
                return validate_prompt_embeds(tensor, hidden, dtype)

            for count in thread_counts:
                torch.set_num_threads(count)
                row = {"shape": shape, "threads": count,
                       "bare_ms": median_ms(bare, repeats), "bare_paused_ms": median_ms(bare, repeats, 0.02),
                       "checked_ms": median_ms(checked, repeats),
                       "checked_paused_ms": median_ms(checked, repeats, 0.02)}
                rows.append(row)
                print(f"{shape:>12} {count:>7} {row['bare_ms']:>8.3f} {row['bare_paused_ms']:>11.3f} "
                      f"{row['checked_ms']:>10.3f} {row['checked_paused_ms']:>11.3f}")
    finally:
        torch.set_num_threads(before)
    return rows


if __name__ == "__main__":
    main()
