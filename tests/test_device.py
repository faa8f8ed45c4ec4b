"""Device choice, autocast precision, the CPU allocator setting and the OpenMP wait policy."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from charlstm.device import autocast_dtype, resolve_device
from charlstm.errors import CharLSTMError

# Page faults while allocating and freeing a 32 MB buffer 20 times, before and after
# keep_freed_memory(): by default glibc unmaps the buffer on free, so each allocation faults in
# all 8,192 of its pages again; afterwards the freed memory is reused.
COUNT_FAULTS = """
import resource, torch
from charlstm.device import keep_freed_memory

def faults():
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        torch.ones(8 << 20).sum()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start

before = faults()
keep_freed_memory()
faults()  # the first allocation after the change still faults its pages in once
print(before, faults())
"""


@pytest.mark.slow
@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)
def test_keep_freed_memory_stops_page_faults_on_every_allocation():
    out = subprocess.run([sys.executable, "-c", COUNT_FAULTS], capture_output=True, text=True)
    before, after = map(int, out.stdout.split())
    assert before > 20 * 8000  # every round faulted its pages in
    assert after < before / 20


def openmp_settings(wait_policy: str | None, run_dir: Path) -> str:
    """What PyTorch's OpenMP runtime reports at start-up in a ``charlstm eval`` command, with
    ``OMP_WAIT_POLICY`` set to ``wait_policy`` (None: unset)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["OMP_DISPLAY_ENV"] = "VERBOSE"  # the runtime prints its settings as it loads
    if wait_policy is not None:
        env["OMP_WAIT_POLICY"] = wait_policy
    command = [sys.executable, "-m", "charlstm", "eval", str(run_dir), "--device", "cpu"]
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    if "OMP_WAIT_POLICY" not in out.stderr:
        pytest.skip("this PyTorch's OpenMP runtime does not display its settings")
    return out.stderr


@pytest.mark.slow
def test_idle_openmp_threads_of_a_command_sleep_instead_of_spinning(trained_run):
    settings = openmp_settings(None, trained_run)
    assert "OMP_WAIT_POLICY = 'PASSIVE'" in settings
    if "GOMP_SPINCOUNT" in settings:  # GNU OpenMP, as in PyTorch's Linux wheels
        assert "GOMP_SPINCOUNT = '0'" in settings


@pytest.mark.slow
def test_a_wait_policy_the_user_set_is_kept(trained_run):
    assert "OMP_WAIT_POLICY = 'ACTIVE'" in openmp_settings("ACTIVE", trained_run)


@pytest.mark.slow
def test_importing_charlstm_leaves_the_process_settings_alone():
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    command = [
        sys.executable,
        "-c",
        "import os, charlstm.training; print(os.environ.get('OMP_WAIT_POLICY'))",
    ]
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "None"


def test_cpu_and_auto_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else None
    if expected:
        assert resolve_device("auto").type == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_missing_cuda_is_a_clear_error():
    with pytest.raises(CharLSTMError, match="--device cuda was asked for but PyTorch sees no"):
        resolve_device("cuda")


def test_precision_choices_on_cpu():
    cpu = torch.device("cpu")
    assert autocast_dtype(cpu, "fp32") is None
    with pytest.raises(CharLSTMError, match="--precision fp16 needs a CUDA device"):
        autocast_dtype(cpu, "fp16")
    native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert autocast_dtype(cpu, "auto") == (torch.bfloat16 if native else None)
