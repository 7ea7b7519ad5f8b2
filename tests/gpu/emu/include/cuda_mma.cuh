// cuda_mma.cuh (emulated): kernels/cuda/cuda_mma.cuh on the CPU with the same fragment
// layouts, so that a kernel that misplaces an element fails here as on a GPU. Each warp
// call deposits this lane's operands, passes a warp barrier, computes this lane's part
// from every lane's deposit, and passes a second barrier before the slots are reused.
// Copies are synchronous: commit and wait do nothing.
#pragma once
#include "cuda_bf16.h"

namespace emu {
inline uint32_t mma_a[1024][4], mma_b[1024][2];
inline const unsigned char *ldsm_row[1024];
inline float bf16_half(uint32_t reg, int high) {
    return __bfloat162float(__nv_bfloat16{(uint16_t)(high ? reg >> 16 : reg & 0xffffu)});
}
} // namespace emu

inline void spar__mma_bf16(float d[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    int t = emu::cur, base = t & ~31, lane = t & 31;
    memcpy(emu::mma_a[t], a, sizeof emu::mma_a[t]);
    emu::mma_b[t][0] = b0, emu::mma_b[t][1] = b1;
    __syncwarp();
    for (int e = 0; e < 4; e++) {
        int row = lane / 4 + (e >= 2 ? 8 : 0), col = 2 * (lane % 4) + (e & 1);
        float s = 0.0f;
        for (int k = 0; k < 16; k++) {
            int al = base + (row % 8) * 4 + (k % 8) / 2, areg = (row >= 8) + (k >= 8) * 2;
            int bl = base + col * 4 + (k % 8) / 2, breg = k >= 8;
            s += emu::bf16_half(emu::mma_a[al][areg], k & 1) *
                 emu::bf16_half(emu::mma_b[bl][breg], k & 1);
        }
        d[e] += s;
    }
    __syncwarp();
}

inline void ldsm(uint32_t r[4], const void *smem, bool trans) {
    int t = emu::cur, base = t & ~31, lane = t & 31;
    emu::ldsm_row[t] = (const unsigned char *)smem;
    __syncwarp();
    for (int i = 0; i < 4; i++) {
        uint16_t h[2];
        for (int x = 0; x < 2; x++) {
            int row = trans ? 2 * (lane % 4) + x : lane / 4, col = trans ? lane / 4 : 2 * (lane % 4) + x;
            memcpy(&h[x], emu::ldsm_row[base + 8 * i + row] + 2 * col, 2);
        }
        r[i] = (uint32_t)h[0] | (uint32_t)h[1] << 16;
    }
    __syncwarp();
}
inline void spar__ldsm_x4(uint32_t r[4], const void *smem) { ldsm(r, smem, false); }
inline void spar__ldsm_x4_t(uint32_t r[4], const void *smem) { ldsm(r, smem, true); }

inline uint32_t spar__pack_bf16(float lo, float hi) {
    return (uint32_t)__float2bfloat16(lo).b | (uint32_t)__float2bfloat16(hi).b << 16;
}

inline void spar__cp_async16(void *smem, const void *src, bool valid) {
    if (valid) memcpy(smem, src, 16);
    else memset(smem, 0, 16);
}
inline void spar__cp_async_commit() {}
template <int N> inline void spar__cp_async_wait() {}
