// mma.h (emulated): nvcuda::wmma 16x16x16 with every lane holding the whole tile; each
// call starts with a warp barrier so that a warp's loads all happen before its stores.
#pragma once
#include "cuda_bf16.h"
#include <type_traits>
namespace nvcuda { namespace wmma {
struct matrix_a {}; struct matrix_b {}; struct accumulator {};
struct row_major {}; struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
template <class Use, int M, int N, int K, class T, class L = void> struct fragment {
    static constexpr int num_elements = 256;
    float x[256];
};
inline float f(float v) { return v; }
inline float f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <class Use, class T, class L, class P> void load_matrix_sync(fragment<Use, 16, 16, 16, T, L> &a, const P *p, unsigned ld) {
    __syncwarp();
    for (int i = 0; i < 16; i++) for (int j = 0; j < 16; j++)
        a.x[i * 16 + j] = std::is_same<L, col_major>::value ? f(p[i + j * ld]) : f(p[i * ld + j]);
}
template <class T> void load_matrix_sync(fragment<accumulator, 16, 16, 16, T> &a, const float *p, unsigned ld, layout_t l) {
    __syncwarp();
    for (int i = 0; i < 16; i++) for (int j = 0; j < 16; j++) a.x[i * 16 + j] = l == mem_col_major ? p[i + j * ld] : p[i * ld + j];
}
template <class T> void store_matrix_sync(float *p, const fragment<accumulator, 16, 16, 16, T> &a, unsigned ld, layout_t l) {
    __syncwarp();
    for (int i = 0; i < 16; i++) for (int j = 0; j < 16; j++) (l == mem_col_major ? p[i + j * ld] : p[i * ld + j]) = a.x[i * 16 + j];
}
template <class T> void fill_fragment(fragment<accumulator, 16, 16, 16, T> &a, float v) { __syncwarp(); for (auto &e : a.x) e = v; }
template <class TA, class LA, class TB, class LB, class T>
void mma_sync(fragment<accumulator, 16, 16, 16, T> &d, const fragment<matrix_a, 16, 16, 16, TA, LA> &a,
              const fragment<matrix_b, 16, 16, 16, TB, LB> &b, const fragment<accumulator, 16, 16, 16, T> &c) {
    __syncwarp();
    float r[256];
    for (int i = 0; i < 16; i++) for (int j = 0; j < 16; j++) { float s = c.x[i * 16 + j]; for (int k = 0; k < 16; k++) s += a.x[i * 16 + k] * b.x[k * 16 + j]; r[i * 16 + j] = s; }
    memcpy(d.x, r, sizeof r);
}
}}
