"""Offline jobs on checkpoints: HF safetensors -> per-leaf Orbax (``convert``), exact comparison (``verify``), and
the parameter/memory plan of a config on a mesh (``plan``). Run ``python -m conversion --help``."""


class UsageError(Exception):
    """Bad input on the command line (missing dir, not a checkpoint, bad --mesh): one line, exit code 2."""


def check_convert_paths(hf, out) -> None:
    """The checks of ``convert``'s arguments that need no JAX (so the CLI answers them at once): the HF dir exists,
    an existing OUT is a conversion (it holds ``manifest.json``, :data:`qwen_jax.checkpoint.MANIFEST`), and OUT can
    be written (not a file, not under a file, under a writable directory)."""
    from pathlib import Path

    from qwen_jax.cli_contract import check_output_dir

    hf, out = Path(hf), Path(out)
    if not hf.is_dir():
        raise UsageError(f"{hf}: HF checkpoint directory not found")
    if out.exists() and not (out / "manifest.json").is_file():
        raise UsageError(f"{out}: exists and is not a converted checkpoint; refusing to touch it")
    check_output_dir(out, "--out")
