"""Benchmarks for SPEC §7, run as ``python -m bench.<name>`` from the repository root."""
