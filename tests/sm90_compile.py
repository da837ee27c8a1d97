"""Compile every Triton kernel configuration for sm_90 without a GPU and print its static profile
(fastdino.kernels.profile: registers, spills, shared memory, CTAs per SM, tensor cores); refuse
register spills, shared memory beyond the sm_90 limit and a matrix-multiplying kernel without
tensor-core instructions.

Run as a script with TRITON_INTERPRET unset (kernels must be JITFunctions). Spills are read from
the cubin with the cuobjdump that Triton ships: non-zero STACK or LOCAL means spilled registers.
"""

import sys

from fastdino.kernels import profile


def main() -> int:
    rows = profile.triton_profiles()
    unread = sum(r.tensor_cores is None for r in rows)
    print(f"compiled {len(rows)} Triton configurations for sm_90"
          f"{' (cuobjdump not shipped with this triton: spills and SASS not read)' if unread else ''}")
    print(profile.summary(rows))
    failures = profile.check(rows)
    for f in failures:
        print("FAILED", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
