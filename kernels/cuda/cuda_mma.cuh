// cuda_mma.cuh: the warp-level tensor-core and copy instructions the fast kernels use,
// as small device functions over PTX (sm_80 and later): mma.sync m16n8k16 with bfloat16
// inputs and fp32 accumulators, ldmatrix (plain and transposed) from shared memory, and
// cp.async 16-byte copies from global to shared memory with zero fill.
//
// Fragment layouts of mma.m16n8k16 (lane = threadIdx.x % 32, r = lane / 4, c = 2 * (lane % 4)):
//   A (16 x 16, row):  a[0] = A[r][c..c+1], a[1] = A[r+8][c..c+1],
//                      a[2] = A[r][c+8..c+9], a[3] = A[r+8][c+8..c+9]
//   B (16 x 8, col):   b[0] = B[c..c+1][r],   b[1] = B[c+8..c+9][r]
//   C, D (16 x 8):     d[0..1] = D[r][c..c+1], d[2..3] = D[r+8][c..c+1]
// (two bf16 in a register: the lower column or row in the low half). So an accumulator of
// two neighbouring 8-column tiles, packed to bf16, is the A fragment of the next product:
// scores become probabilities without leaving registers.
//
// tests/gpu/emu/include has a CPU version of this file with the same layouts.
//
// Defines: spar__mma_bf16, spar__ldsm_x4, spar__ldsm_x4_t, spar__pack_bf16,
//          spar__cp_async16, spar__cp_async_commit, spar__cp_async_wait.
#ifndef SPAR_CUDA_MMA_CUH
#define SPAR_CUDA_MMA_CUH

#include <cuda_bf16.h>
#include <stdint.h>

// d += A B for one 16 x 8 x 16 tile.
__device__ __forceinline__ void spar__mma_bf16(float d[4], const uint32_t a[4], uint32_t b0,
                                               uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four 8 x 8 bf16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, and
// r[i] receives row lane / 4, columns c..c+1 of matrix i.
__device__ __forceinline__ void spar__ldsm_x4(uint32_t r[4], const void *smem) {
    uint32_t addr = (uint32_t)__cvta_generic_to_shared(smem);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// The same, transposed: r[i] receives rows c and c+1 of column lane / 4 of matrix i.
__device__ __forceinline__ void spar__ldsm_x4_t(uint32_t r[4], const void *smem) {
    uint32_t addr = (uint32_t)__cvta_generic_to_shared(smem);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// Two floats as bf16 (round to nearest even), lo in the low half.
__device__ __forceinline__ uint32_t spar__pack_bf16(float lo, float hi) {
    return (uint32_t)__bfloat16_as_ushort(__float2bfloat16(lo)) |
           (uint32_t)__bfloat16_as_ushort(__float2bfloat16(hi)) << 16;
}

// 16 bytes from global to shared memory without passing through registers; when !valid
// nothing is read and the 16 bytes are zeros (src must still be a mapped address).
__device__ __forceinline__ void spar__cp_async16(void *smem, const void *src, bool valid) {
    uint32_t addr = (uint32_t)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 :
                 : "r"(addr), "l"(src), "r"(valid ? 16 : 0));
}

// Closes the group of copies this thread issued since the last commit.
__device__ __forceinline__ void spar__cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::);
}

// Waits until at most N of this thread's groups are still in flight. Other threads'
// copies are seen only after a barrier.
template <int N> __device__ __forceinline__ void spar__cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

#endif
