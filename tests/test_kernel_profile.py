"""fastdino.kernels.profile: the occupancy arithmetic, what its check refuses, and its reading of
cubins: a CUDA file compiled here with nvcc for sm_90a (a tensor-core kernel, a scalar one named as
fastdino's masked_attention, one that spills) profiled as fastdino._C's kernels are."""

import os
import shutil
import subprocess

import pytest

from fastdino.kernels import profile
from fastdino.kernels.profile import KernelProfile, check, occupancy


def test_occupancy_from_registers_shared_memory_and_threads():
    # 168 registers x 32 lanes = 5376 per warp (21 units of 256); 12 warps fit: 3 CTAs of 4 warps
    assert occupancy(168, 128, 24576) == 3
    # 32 registers, 256 threads: threads bound it (2048 / 256 = 8); shared memory 100 KB: 2
    assert occupancy(32, 256, 0) == 8
    assert occupancy(32, 256, 100 * 1024) == 2
    # 255 registers x 1024 threads cannot fit 65536 registers: no CTA
    assert occupancy(255, 1024, 0) == 0
    # tiny CTAs: the 32-CTA limit
    assert occupancy(16, 32, 0) == 32


def _row(**kw):
    base = dict(op="masked_attention", kernel="k", config="c", threads=128, regs=64, spill_bytes=0, smem=0,
                matmul=True, tensor_cores=True, source="triton")
    return KernelProfile(**{**base, **kw})


def test_the_check_refuses_spills_oversized_shared_memory_and_scalar_matmuls():
    assert check([_row()]) == []
    assert "spills 16 bytes" in check([_row(spill_bytes=16)])[0]
    assert "shared memory" in check([_row(smem=240000)])[0]
    assert "without tensor-core instructions" in check([_row(tensor_cores=False)])[0]
    assert check([_row(tensor_cores=None)]) == []  # SASS not read: nothing claimed
    assert check([_row(matmul=False, tensor_cores=False)]) == []
    # the CUDA masked_attention kernel is allowed, with its reason in NO_TENSOR_CORES
    assert check([_row(source="cuda", tensor_cores=False)]) == []
    assert "without tensor-core" in check([_row(source="cuda", op="rope_attention", tensor_cores=False)])[0]


TOY = r"""
#include <mma.h>
namespace fastdino { namespace {
__global__ void masked_attention_toy(const float* q, float* o, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) o[i] = q[i] * q[i] + 1.0f;
}
__global__ void spilling_toy(const float* x, float* o, int n) {
  float acc[256];
  for (int j = 0; j < 256; ++j) acc[j] = x[(threadIdx.x * 7 + j * 13) % n];
  for (int r = 0; r < 8; ++r)
    for (int j = 0; j < 256; ++j) acc[(j * 31 + r) % 256] += acc[(j * 17 + 3 * r) % 256] * x[j % n];
  o[threadIdx.x] = acc[x[0] > 0 ? threadIdx.x % 256 : 3];
}
}
__global__ void fused_linear_wmma_toy(const half* a, const half* b, float* c) {
  using namespace nvcuda;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, half, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, half, wmma::col_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> fc;
  wmma::fill_fragment(fc, 0.0f);
  wmma::load_matrix_sync(fa, a, 16);
  wmma::load_matrix_sync(fb, b, 16);
  wmma::mma_sync(fc, fa, fb, fc);
  wmma::store_matrix_sync(c, fc, 16, wmma::mem_row_major);
}
void launch(const float* q, float* o, int n) {
  masked_attention_toy<<<1, 32>>>(q, o, n);
  spilling_toy<<<1, 32>>>(q, o, n);
}
}
void launch_mma(const half* a, const half* b, float* c) {
  fastdino::fused_linear_wmma_toy<<<1, 32>>>(a, b, c);
}
"""


@pytest.mark.slow
def test_cuda_kernels_are_read_from_a_binary(tmp_path):
    nvcc = shutil.which("nvcc") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    if not os.path.exists(nvcc) or profile._tool("cuobjdump") is None:
        pytest.skip("needs nvcc and the cuobjdump shipped with triton")
    src, lib = tmp_path / "toy.cu", tmp_path / "toy.so"
    src.write_text(TOY)
    done = subprocess.run([nvcc, "-shared", "-Xcompiler", "-fPIC", "-gencode", "arch=compute_90a,code=sm_90a",
                           "-o", str(lib), str(src)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {r.kernel: r for r in profile.cuda_profiles(str(lib))}
    scalar = next(r for k, r in rows.items() if "masked_attention_toy" in k)
    mma = next(r for k, r in rows.items() if "fused_linear_wmma_toy" in k)
    spill = next(r for k, r in rows.items() if "spilling_toy" in k)
    assert scalar.matmul and scalar.tensor_cores is False and scalar.op == "masked_attention"
    assert mma.tensor_cores is True and not mma.matmul and mma.op == "fused_linear"
    assert spill.spill_bytes > 0 and scalar.spill_bytes == 0 and scalar.regs > 0
    failures = check(list(rows.values()))
    assert len(failures) == 1 and "spilling_toy" in failures[0]


def test_headline_grids_count_the_programs_each_launch_starts():
    # masked_attention at batch 1 (100 queries, 8 heads, 1024 keys): one 128-row query block per head,
    # the keys split in 8 (4 blocks of 32 each, the least a split takes): 64 programs, then the combine
    # step over 16-row blocks, 7 x 8; the mask packed by one program per query row
    rows = {(op, kernel): programs for op, kernel, programs in profile.headline_grids()}
    assert rows[("masked_attention", "_masked_attention_fwd_kernel")] == "64"
    assert rows[("masked_attention", "_masked_attention_combine_kernel")] == "56"
    assert rows[("masked_attention", "_masked_attention_pack_kernel")] == "100"
    from fastdino.ops import OPS

    assert {op for op, _ in rows} == set(OPS) and all(p.isdigit() and int(p) > 0 for p in rows.values())
