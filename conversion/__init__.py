"""Offline jobs on checkpoints: HF safetensors -> per-leaf Orbax (``convert``), exact comparison (``verify``), and
the parameter/memory plan of a config on a mesh (``plan``). Run ``python -m conversion --help``."""


class UsageError(Exception):
    """Bad input on the command line (missing dir, not a checkpoint, bad --mesh): one line, exit code 2."""
