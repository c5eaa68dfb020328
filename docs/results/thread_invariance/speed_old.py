"""Run a script as the decode was before the thread-invariance change: MKL's default mode
(MKL_CBWR empty) and the conditioning net's convolutions through oneDNN.

usage: python docs/results/thread_invariance/speed_old.py SCRIPT.py ARGS...
"""
import contextlib
import os
import runpy
import sys

os.environ["MKL_CBWR"] = ""  # set before bpd_sr is imported: its default is then not applied

import bpd_sr.model.conditioning as conditioning  # noqa: E402

conditioning._thread_invariant = lambda x: contextlib.nullcontext()
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
