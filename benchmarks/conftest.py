import os
import subprocess

import helpers  # noqa: F401  (first: sets TRITON_INTERPRET on CPU before fastdino.kernels loads)


def pytest_benchmark_update_machine_info(config, machine_info):
    from fastdino.info import build_info

    info = build_info()
    commit = os.environ.get("FASTDINO_COMMIT")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                    check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    machine_info["fastdino"] = {**info, "commit": commit, "copy_gbps": copy_bandwidth()}


def copy_bandwidth(nbytes: int = 1 << 30):
    """The GPU's device-to-device copy rate in GB/s (bytes read + written over the median time of a
    1 GiB copy_), the achievable bandwidth the memory-bound ops are held to; None without a GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    import triton.testing

    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=100, return_mode="median")
    return 2 * nbytes / ms / 1e6
