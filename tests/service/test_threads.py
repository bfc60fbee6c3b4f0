"""Startup's torch work leaves no OpenMP team behind (see `mintd.service.threads` for why it matters)."""

import subprocess
import sys
from pathlib import Path

import pytest

from mintd.service.threads import on_passing_thread

# The process's threads that Python did not start: OpenMP workers, here (a parallel op on a thread
# makes that thread a team of `torch.get_num_threads()`, kept until the thread exits).
PROBE = """
import os, sys, threading, time
import torch
torch.set_num_threads(2)

def native():
    time.sleep(0.3)  # a released team's workers take a moment to exit
    return len(os.listdir("/proc/self/task")) - threading.active_count()

def parallel_work():
    torch.randn(1 << 22).exp_()
    return (torch.randn(1024, 1024) @ torch.randn(1024, 1024)).sum()

before = native()
{body}
"""


def run_probe(body: str, *args: str) -> list[int]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(body=body), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return [int(n) for n in out.stdout.split()]


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="counts threads through Linux's /proc")
def test_a_passing_threads_openmp_team_ends_with_it_and_the_main_threads_stays():
    passing, main = run_probe(
        "from mintd.service.threads import on_passing_thread\n"
        "on_passing_thread(parallel_work)\n"
        "passing = native()\n"
        "parallel_work()\n"
        "print(passing - before, native() - before)"
    )
    assert passing == 0
    assert main == 1  # the control: the same work on the main thread keeps a worker


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="counts threads through Linux's /proc")
def test_building_the_server_leaves_no_openmp_team(qwen3_dir, tmp_path):
    """Packing every base linear for oneDNN (bfloat16) runs parallel reorders while the engine loads."""
    (left,) = run_probe(
        "from mintd.config import EngineSettings, ServeSettings\n"
        "from mintd.server import build_app\n"
        "engine = EngineSettings(device='cpu', dtype='bfloat16', cpu_packed_min_weight=0)\n"
        "settings = ServeSettings(data_dir=sys.argv[2])\n"
        "_, service = build_app({'tiny': sys.argv[1]}, settings, engine_settings=engine)\n"
        "print(native() - before)\n"
        "service.close()",
        str(qwen3_dir),
        str(tmp_path),
    )
    assert left == 0


def test_the_passing_thread_returns_the_value_and_raises_the_error():
    assert on_passing_thread(lambda: 7) == 7
    with pytest.raises(ValueError, match="boom"):
        on_passing_thread(lambda: (_ for _ in ()).throw(ValueError("boom")))
