"""A memory roofline for greedy decode: the bytes one batch-1 step must read, over the machine's read bandwidth.

A batch-1 decode step reads every weight it multiplies by once: the lm_head (all of it: greedy takes the argmax over
the whole vocabulary), each layer's attention or DeltaNet projections, router and shared expert, and the ``top_k``
routed experts its token chose, of the ``n_experts`` stacked ones; of the embedding table it reads one row. No
implementation that computes these products exactly can take less than ``bytes / bandwidth`` per step, so
``bandwidth / bytes`` bounds its tokens per second from above (caches cannot help much: the weights a step reads
are larger than the last-level cache and are streamed in the same order every step).

:func:`read_bandwidth` measures the read bandwidth in this process: the best of a few sums over a buffer larger
than the caches, one thread per core (:func:`bandwidth_probe`).

    python bench/roofline.py [--gib 2] [--repeats 5]    # prints the measured read bandwidth
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import time
from collections.abc import Callable

import numpy as np

GB = 1e9


def bandwidth_probe(n_bytes: int, repeats: int = 5, threads: int | None = None) -> Callable[[], float]:
    """A function that measures the read bandwidth in bytes per second: the fastest of ``repeats`` full reads of an
    ``n_bytes`` buffer (allocated once here), summed in ``threads`` parts at once (default: one per usable core;
    numpy's sum releases the GIL). One thread does not reach the memory's bandwidth: here (2 cores, quiet,
    2026-12-02) one read a 2 GiB buffer at 14.8 GB/s, two at 28.1 GB/s. A buffer larger than the last-level cache
    measures the memory; a smaller one, the cache (this machine's L3 is 480 MiB)."""
    threads = threads or len(os.sched_getaffinity(0))
    parts = np.array_split(np.ones(n_bytes // 4, np.float32), threads)
    pool = concurrent.futures.ThreadPoolExecutor(threads)

    def measure() -> float:
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = min(best, time.perf_counter() - start)
        return sum(part.nbytes for part in parts) / best

    return measure


def read_bandwidth(gib: float = 2.0, repeats: int = 5) -> float:
    """Bytes per second of the fastest of ``repeats`` full reads of a ``gib`` GiB buffer (:func:`bandwidth_probe`)."""
    return bandwidth_probe(int(gib * 2**30), repeats)()


def decode_step_bytes(named_sizes: dict[str, int], top_k: int, n_experts: int) -> int:
    """Bytes a batch-1 decode step reads, from the parameters' byte sizes keyed by their path: everything, except
    the embedding table (one row) and the routed experts' stacked tensors (``top_k`` of ``n_experts``)."""
    total = 0
    for path, size in named_sizes.items():
        leaf = path.rsplit("/", 1)[-1]
        if leaf == "embed_tokens":
            continue
        total += size * top_k // n_experts if leaf in ("gate_up", "down") else size
    return total


def model_decode_step_bytes(model) -> int:
    """:func:`decode_step_bytes` of a ``qwen_jax`` model (loaded, or abstract from ``nnx.eval_shape``)."""
    import numpy as np
    from flax import nnx

    sizes = {}
    for path, variable in nnx.to_flat_state(nnx.state(model)):
        value = variable.get_value()
        sizes["/".join(map(str, path))] = int(np.prod(value.shape)) * np.dtype(value.dtype).itemsize
    return decode_step_bytes(sizes, model.cfg.num_experts_per_tok, model.cfg.num_experts)


def bound(step_bytes: int, bandwidth: float, reference_tok_s: float | None = None) -> dict:
    """The roofline: bytes per step, bandwidth, the most tokens per second, and that over a reference's speed."""
    out = {
        "bytes_per_step_gb": step_bytes / GB,
        "read_gb_per_s": bandwidth / GB,
        "max_tokens_per_s": bandwidth / step_bytes,
    }
    if reference_tok_s:
        out["max_ratio_over_reference"] = out["max_tokens_per_s"] / reference_tok_s
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gib", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(json.dumps({"read_gb_per_s": read_bandwidth(args.gib, args.repeats) / GB}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
