"""Process environment that must be in place before a native library starts.

Called at the entry points (the command line, the server) and just before the library that
reads it loads, never as a side effect of importing a vestis module. A variable the user has
set is left alone.
"""

from __future__ import annotations

import os


def quiet_openmp() -> None:
    """Idle OpenMP workers sleep instead of spinning. Must run before FAISS starts its OpenMP
    runtime: on a small machine shared with other work, spinning workers made one Flat query
    over 10k vectors take 24 ms instead of 0.3 ms. Set OMP_WAIT_POLICY yourself to choose
    otherwise."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def offline_hf() -> None:
    """The packaged sentence model is read from disk: Hugging Face libraries must not try
    the network (they would wait on it where there is none)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def configure() -> None:
    """Everything above: what an entry point calls first."""
    quiet_openmp()
    offline_hf()
