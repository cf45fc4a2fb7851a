"""Hostile calls against the CVAT tracker through nuclio-sdk's test platform: statuses, time
and peak memory.

    python benchmarks/cvat_fuzz.py --calls 10000 --seed 7

Bodies come from ``tests/cvat/hostile_calls.py`` (honest starts and continues mixed with
malformed JSON, hostile mask runs, polygons, images, states, type confusion, object floods)
and reach the handler as nuclio hands them over (``application/json`` decoded by nuclio's
own wrapper first). Prints the count of each status per kind of call, the slowest calls, the
process's peak resident memory (``ru_maxrss``) before and after, and whether any call got a
5xx. Exit status 1 if one did.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "cvat"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--model", default="lite0-match")
    args = parser.parse_args()

    os.environ.setdefault("NAPARI_STM_MODEL", args.model)
    os.environ.setdefault("NAPARI_STM_DEVICE", "cpu")
    os.environ.setdefault("NAPARI_STM_MAX_SESSIONS", "4096")
    os.environ.pop("CVAT_FUNCTIONS_REDIS_HOST", None)

    from cvat_lambda import call_nuclio
    from hostile_calls import Fuzzer
    from nuclio_sdk.test import Platform

    platform = Platform()
    fuzzer = Fuzzer(seed=args.seed)
    # The model loads on the first call: warm up with an honest one, outside the figures.
    call_nuclio(
        platform, json.dumps({"image": fuzzer.images[0], "shapes": [[1, 1, 9, 9]]}).encode()
    )
    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    statuses: dict[str, Counter] = defaultdict(Counter)
    slowest: list[tuple[float, str, int]] = []
    fives = 0
    start = time.perf_counter()
    for kind, body in fuzzer.calls(args.calls):
        t0 = time.perf_counter()
        response = call_nuclio(platform, body)
        dt = time.perf_counter() - t0
        reply = json.loads(response.body)
        statuses[kind.split(":")[0]][response.status_code] += 1
        fives += response.status_code >= 500
        slowest = sorted([*slowest, (dt, kind, response.status_code)], reverse=True)[:5]
        fuzzer.observe(kind, response.status_code, reply)
    wall = time.perf_counter() - start
    rss_end = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    total: Counter = Counter()
    print(f"{args.calls} calls, seed {args.seed}, model {args.model}, {wall:.1f} s")
    for kind, counts in sorted(statuses.items()):
        total.update(counts)
        print(f"  {kind:8s} {sum(counts.values()):6d}  {dict(sorted(counts.items()))}")
    print(f"  {'all':8s} {sum(total.values()):6d}  {dict(sorted(total.items()))}")
    print(f"5xx: {fives}")
    print("slowest: " + ", ".join(f"{dt * 1000:.0f} ms ({k}, {s})" for dt, k, s in slowest))
    print(f"peak RSS: {rss_start:.0f} MiB after warm-up, {rss_end:.0f} MiB at the end")
    handler = platform._handler_contexts[next(iter(platform._handler_contexts))]
    store = handler.user_data.model_handler.store
    print(f"sessions alive: {len(store)}, {store.nbytes / 2**20:.1f} MiB")
    return 1 if fives else 0


if __name__ == "__main__":
    sys.exit(main())
