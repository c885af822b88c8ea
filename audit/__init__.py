"""Audit tools for the Qwen3.6-35B-A3B MERA Industrial submission: benchmark replay, scoring and reports."""
