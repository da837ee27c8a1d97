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
    machine_info["fastdino"] = {**info, "commit": commit}
