#!/usr/bin/python3
"""Benchmarks kata against runc on this machine: see scripts/kata_bench/ and BENCHMARKS.md."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from kata_bench.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
