"""A memory roofline for greedy decode: the bytes one batch-1 step must read, over the machine's read bandwidth.

A batch-1 decode step reads every weight it multiplies by once: the lm_head (all of it: greedy takes the argmax over
the whole vocabulary), each layer's attention or DeltaNet projections, router and shared expert, and the ``top_k``
routed experts its token chose, of the ``n_experts`` stacked ones; of the embedding table it reads one row. No
implementation that computes these products exactly can take less than ``bytes / bandwidth`` per step, so
``bandwidth / bytes`` bounds its tokens per second from above (caches cannot help much: the weights a step reads
are larger than the last-level cache and are streamed in the same order every step).

:func:`read_bandwidth` measures the read bandwidth in this process: the best of a few sums over a buffer larger
than the caches (numpy, one thread; on the 2-core bench machine two threads read no faster, measured with a
hand-written AVX-512 loop, 2026-12-02).

    python bench/roofline.py [--gib 2] [--repeats 5]    # prints the measured read bandwidth
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

GB = 1e9


def read_bandwidth(gib: float = 2.0, repeats: int = 5) -> float:
    """Bytes per second of the fastest of ``repeats`` full reads (a float32 sum) of a ``gib`` GiB buffer."""
    buffer = np.ones(int(gib * 2**30) // 4, np.float32)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    return buffer.nbytes / best


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
