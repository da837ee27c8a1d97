"""The scripts the GPU run calls, run where they can without a GPU: scripts/sanitize.py's cases on
the C++ CPU kernels (on the GPU it runs them under compute-sanitizer), and the shell syntax of
scripts/gpu_run.sh."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import requires_ext

import fastdino

ROOT = Path(__file__).resolve().parents[1]


@requires_ext
def test_sanitize_cases_pass_on_the_cpu_kernels(tmp_path):
    # the fastdino this process imports (installed or the checkout), with its built extension
    env = dict(os.environ, PYTHONPATH=str(Path(fastdino.__file__).parents[1]))
    script = str(ROOT / "scripts" / "sanitize.py")
    run = subprocess.run([sys.executable, script, "--device", "cpu", "--backends", "cpu"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    lines = run.stdout.splitlines()
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert not [line for line in lines if line.startswith("FAIL")]
    assert len([line for line in lines if line.startswith("ok ")]) >= 6  # every op ran


def test_gpu_run_script_parses():
    bash = "/bin/bash"
    if not Path(bash).exists():
        pytest.skip("no bash")
    subprocess.run([bash, "-n", str(ROOT / "scripts" / "gpu_run.sh")], check=True)
