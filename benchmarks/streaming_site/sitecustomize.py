"""Loaded by Python at start-up when this directory is on PYTHONPATH (benchmarks only).

With ``BASTION_BENCH_STREAMING=1`` it applies :mod:`streaming_proposal` to
the executor process; otherwise it does nothing.
"""
import os
import sys

if os.environ.get("BASTION_BENCH_STREAMING") == "1":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import streaming_proposal

    streaming_proposal.apply()
