"""Native CPU kernels, called from JAX as XLA FFI custom calls: a grouped matmul for decode steps and prefills, and
the delta rule's one-token step for the batch-invariant mode's decode steps.

XLA:CPU copies an expert's weights out of the stacked [E, in, out] tensor before a dot can read them (a dynamic
slice, a static slice or a gather alike), and in a decode step those copies cost more than the matmuls.
:func:`grouped_matmul` (``grouped_matmul.cc``) reads the weights where they lie. Each output element is one chain
of fused multiply-adds over the input features in order, from zero: a row's result depends on its own row and its
expert's weights only (batch-invariant by construction), and is the same with AVX-512, AVX2 or scalar code.
A call's work (experts x column chunks) is shared with a persistent pool of worker threads (one per other core);
which thread computes an element changes none of its bits. In the batch-invariant mode a decode step's dense
products (``ops.dense``: projections, lm_head) run through it too, all rows at once.

:func:`delta_rule_step` (``delta_rule.cc``) is the Gated DeltaNet's one-token update in the batch-invariant mode's
decode steps, all rows at once, instead of XLA's per-row loop: each (row, head) by the same chains of fused
multiply-adds over the key dimension in order (batch-invariant by construction), heads shared over the same pool,
the state updated in place (its buffer aliased: the decode loop's donated cache is not copied). Measured under
load at batch 16 on the bench config (8 heads of 64 x 64, one layer): 0.10 ms against 0.73-0.87 ms for the per-row
loop; at 32 heads of 128 x 128, 1.5-1.7 ms against 27 ms; the invariant decode loop 26.9 ms a step against 32.0.

The sources are compiled on first use with the C++ compiler (``$CXX``, else ``g++``) into one shared library cached
under ``$QWEN_JAX_KERNEL_CACHE`` (default ``$XDG_CACHE_HOME/qwen_jax/kernels`` or ``~/.cache/qwen_jax/kernels``),
named by a hash of the sources and headers, the flags, the compiler, jaxlib's version and the CPU
(``-march=native`` code runs only where it was built). A build is written to a temporary file and renamed, so
concurrent processes can race.
A prefill (``qwen_jax.generate``'s, traced in :func:`prefill_mode`: a program never differentiated) may use
them too (:func:`for_prefill`); a forward keeps XLA's differentiable paths. ``QWEN_JAX_CPU_KERNELS=0`` switches
the kernels off; without a compiler, or if the build fails, the callers keep their XLA path and one warning says
why.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from qwen_jax.invariance import in_decode_step, tracing_with

#: Set to ``0`` to keep the XLA paths (no build, no custom call).
ENV_SWITCH = "QWEN_JAX_CPU_KERNELS"
#: Where the built libraries go (default: the user's cache directory).
ENV_CACHE = "QWEN_JAX_KERNEL_CACHE"

_HERE = Path(__file__).parent
#: The library's sources, compiled together into one shared library, and the headers they include.
SOURCES = (_HERE / "grouped_matmul.cc", _HERE / "delta_rule.cc", _HERE / "attention.cc")
HEADERS = (_HERE / "pool.h", _HERE / "simd.h")
TARGET = "qwen_jax_grouped_matmul"
DELTA_RULE_TARGET = "qwen_jax_delta_rule_step"
#: XLA FFI target -> the handler's symbol in the library.
ATTENTION_TARGET = "qwen_jax_decode_attention"
TARGETS = {
    TARGET: "QwenGroupedMatmul",
    DELTA_RULE_TARGET: "QwenDeltaRuleStep",
    ATTENTION_TARGET: "QwenDecodeAttention",
}
#: No -ffast-math: the kernel's sums must keep their order. -ffp-contract=off: every fused multiply-add is written.
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread", "-ffp-contract=off", "-w")


def switched_on() -> bool:
    """Whether the environment allows the native kernels (``QWEN_JAX_CPU_KERNELS`` is not ``0``)."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qwen_jax" / "kernels"


def _cpu_fingerprint() -> str:
    """The CPU model and feature flags (what ``-march=native`` compiles for), or the platform where unreadable."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    wanted = ("model name", "flags", "Features", "CPU part")
    return "\n".join(sorted({line for line in lines if line.split(":")[0].strip() in wanted}))


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def library_path(compiler: str) -> Path:
    """The cached library for these sources and headers, these flags, this compiler, this jaxlib and this CPU."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    key = hashlib.sha256()
    files = (f.read_bytes() for f in (*SOURCES, *HEADERS))
    for part in (*files, " ".join(FLAGS).encode(), *(v.encode() for v in version)):
        key.update(part + b"\0")
    key.update(f"{jaxlib.__version__}\0{platform.machine()}\0{_cpu_fingerprint()}".encode())
    return cache_dir() / f"kernels-{key.hexdigest()[:20]}.so"


def build(compiler: str, path: Path) -> Path:
    """Compiles the sources into ``path`` (a temporary file in the same directory, renamed once complete)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so.tmp", dir=path.parent)
    os.close(fd)
    try:
        command = [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", *map(str, SOURCES), "-o", tmp]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"{Path(compiler).name} failed ({last})")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


@functools.cache
def _registered() -> bool:
    """Builds (or finds) the library and registers its handlers with XLA once per process; False if it cannot."""
    compiler = _compiler()
    if compiler is None:
        warnings.warn(
            f"qwen_jax: no C++ compiler ({os.environ.get('CXX', 'g++')}) for the CPU expert kernel: "
            f"using XLA's path (set {ENV_SWITCH}=0 to silence)",
            stacklevel=3,
        )
        return False
    try:
        path = library_path(compiler)
        if not path.exists():
            build(compiler, path)
        library = ctypes.cdll.LoadLibrary(str(path))
        for target, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as error:
        warnings.warn(
            f"qwen_jax: the CPU expert kernel is unavailable ({error}): using XLA's path "
            f"(set {ENV_SWITCH}=0 to silence)",
            stacklevel=3,
        )
        return False
    return True


def enabled() -> bool:
    """Whether the kernels may be used now: the CPU backend, switched on, and the library built."""
    return jax.default_backend() == "cpu" and switched_on() and _registered()


def for_decode_step() -> bool:
    """Whether the code being traced uses the native kernels: a decode step (the kernels have no derivative, and a
    forward or prefill keeps XLA's path) with :func:`enabled` true."""
    return in_decode_step() and enabled()


_PREFILL = contextvars.ContextVar("qwen_jax_prefill", default=False)


def prefill_mode() -> contextlib.AbstractContextManager:
    """Traces the enclosed code as a prefill: a program that is never differentiated (``qwen_jax.generate``'s), so
    the kernels may compute its many-row products (:func:`for_prefill`)."""
    return tracing_with(_PREFILL, True)


def for_prefill() -> bool:
    """Whether the code being traced is a prefill (:func:`prefill_mode`) with :func:`enabled` true: the kernels may
    serve it where they are faster (the caller decides where)."""
    return _PREFILL.get() and enabled()


def grouped_matmul(x: jax.Array, group_sizes: jax.Array, weights: jax.Array) -> jax.Array:
    """out[r] = x[r] @ weights[expert(r)] in fp32, for rows ``x`` [R, K] sorted by expert (``group_sizes`` [E]: the
    first ``group_sizes[0]`` rows are expert 0's, ...; rows in no group give zeros) and ``weights`` [E, K, N]; x and
    weights fp32 or bf16. Read in place; each element summed over k = 0..K-1 in order, whatever the other rows.
    Not differentiable (decode steps only). Call only where :func:`enabled` is true."""
    if (
        x.ndim != 2
        or weights.ndim != 3
        or x.shape[1] != weights.shape[1]
        or group_sizes.shape != weights.shape[:1]
    ):
        raise ValueError(
            f"grouped_matmul: x {x.shape}, group_sizes {group_sizes.shape} and weights {weights.shape} do not fit"
        )
    out = jax.ShapeDtypeStruct((x.shape[0], weights.shape[2]), jnp.float32)
    return jax.ffi.ffi_call(TARGET, out)(x, group_sizes.astype(jnp.int32), weights)


def delta_rule_step(q, k, v, g, beta, state):
    """:func:`qwen_jax.delta_rule.delta_rule_step` (same signature: q, k [B, 1, H, dk], v [B, 1, H, dv], g and beta
    [B, 1, H], state [B, H, dk, dv], all fp32; returns out [B, 1, H, dv] and the new state) in the native kernel
    (``delta_rule.cc``): each (row, head) by the same fixed loops whatever the batch; the state is updated in place
    (its buffer aliased to the new state's). decay = exp(g) is XLA's. Not differentiable (decode steps only). Call
    only where :func:`enabled` is true."""
    operands = {"q": q, "k": k, "v": v, "g": g, "beta": beta, "state": state}
    b, h, dk, dv = state.shape if state.ndim == 4 else (None,) * 4
    expected = {
        "q": (b, 1, h, dk),
        "k": (b, 1, h, dk),
        "v": (b, 1, h, dv),
        "g": (b, 1, h),
        "beta": (b, 1, h),
        "state": (b, h, dk, dv),
    }
    if b is None or any(a.shape != expected[name] or a.dtype != jnp.float32 for name, a in operands.items()):
        shapes = ", ".join(f"{name} {a.shape} {a.dtype}" for name, a in operands.items())
        raise ValueError(
            f"delta_rule_step: expected fp32 q, k [B, 1, H, dk], v [B, 1, H, dv], g, beta [B, 1, H] and state "
            f"[B, H, dk, dv]; got {shapes}"
        )
    out_shapes = (
        jax.ShapeDtypeStruct((b, h, dv), jnp.float32),
        jax.ShapeDtypeStruct(state.shape, jnp.float32),
    )
    call = jax.ffi.ffi_call(DELTA_RULE_TARGET, out_shapes, input_output_aliases={5: 1})
    out, state = call(q[:, 0], k[:, 0], v[:, 0], jnp.exp(g[:, 0]), beta[:, 0], state)
    return out[:, None], state


def decode_attention(
    q: jax.Array, keys: jax.Array, values: jax.Array, key_mask: jax.Array, slots: jax.Array
) -> jax.Array:
    """One decode step's attention (``attention.cc``): q [B, 1, Hq, D], one query per row at key slot ``slots``
    [B]; keys and values [B, T, Hkv, D] (q, keys and values of one dtype, fp32 or bf16); key_mask [B, T], nonzero
    for real keys. A query sees the real keys at slots <= its own; query head h reads KV head h // (Hq // Hkv).
    Scores rounded as ``qwen_jax.attention._scores``, softmax in fp32, probabilities rounded to the values' dtype,
    accumulated in fp32; returns [B, 1, Hq, D] in the values' dtype. Each row by the same loops whatever the batch
    or the cache length. Not differentiable (decode steps only). Call only where :func:`enabled` is true."""
    b, length, n_q, d = q.shape
    n_kv = keys.shape[2]
    if (
        length != 1
        or keys.ndim != 4
        or keys.shape != values.shape
        or keys.shape[0] != b
        or keys.shape[3] != d
        or n_q % n_kv
        or key_mask.shape != keys.shape[:2]
        or slots.shape != (b,)
        or not q.dtype == keys.dtype == values.dtype
        or q.dtype not in (jnp.float32, jnp.bfloat16)
    ):
        raise ValueError(
            f"decode_attention: expected q [B, 1, Hq, D], keys and values [B, T, Hkv, D] of q's dtype (fp32 or "
            f"bf16), key_mask [B, T], slots [B]; got q {q.shape} {q.dtype}, keys {keys.shape} {keys.dtype}, "
            f"values {values.shape} {values.dtype}, key_mask {key_mask.shape}, slots {slots.shape}"
        )
    grouped = q.reshape(b, n_kv, n_q // n_kv, d)
    out = jax.ShapeDtypeStruct(grouped.shape, jnp.float32)
    call = jax.ffi.ffi_call(ATTENTION_TARGET, out)
    scale = np.float32(d**-0.5)
    attn = call(grouped, keys, values, key_mask.astype(jnp.int32), slots.astype(jnp.int32), scale=scale)
    return attn.astype(values.dtype).reshape(q.shape)
