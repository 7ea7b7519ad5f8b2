// emu_core.h: the CUDA execution model on the CPU, for tests/gpu/emu: a grid runs one
// block at a time; a block's threads are coroutines (ucontext) that switch only at
// __syncthreads, __syncwarp, shuffles and wmma calls, so every thread runs up to its next
// barrier before any other passes it. Shared memory is static (one block at a time) plus
// one dynamic buffer, filled with garbage bytes per block as a GPU's would be. A barrier
// that can never be passed (threads of one block waiting at different barriers) aborts.
// It checks a kernel's logic against the oracle; it says nothing of speed, register or
// shared-memory limits, or races between warps that real hardware would expose.
#pragma once
#include <ucontext.h>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>
#include <algorithm>
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __align__(x) alignas(x)
#define __shared__ static
struct dim3 { unsigned x, y, z; dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {} };
struct uint4 { unsigned x, y, z, w; };
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
inline dim3 threadIdx, blockIdx, blockDim, gridDim;
inline unsigned char *emu_dyn_smem;
namespace emu {
enum { RUN = 0, WBLOCK = 1, WWARP = 2, DONE = 3 };
struct Thr { ucontext_t ctx; int state; };
inline std::vector<Thr> thr;
inline std::vector<char *> stacks;
inline ucontext_t sched;
inline int cur, nthr;
inline std::function<void()> *body;
inline float shfl_slots[1024];
inline void yield(int st) { thr[cur].state = st; swapcontext(&thr[cur].ctx, &sched); }
inline void entry(int t) { (*body)(); thr[t].state = DONE; }
struct Cfg { dim3 g, b; size_t smem = 0; void *stream = nullptr; };
inline void run_block(const Cfg &c) {
    nthr = (int)(c.b.x * c.b.y * c.b.z);
    const size_t SS = 256 * 1024;
    thr.resize(nthr);
    while ((int)stacks.size() < nthr) stacks.push_back((char *)malloc(SS));
    for (int t = 0; t < nthr; t++) {
        getcontext(&thr[t].ctx);
        thr[t].ctx.uc_stack.ss_sp = stacks[t], thr[t].ctx.uc_stack.ss_size = SS;
        thr[t].ctx.uc_link = &sched;
        makecontext(&thr[t].ctx, (void (*)())entry, 1, t);
        thr[t].state = RUN;
    }
    for (;;) {
        for (int t = 0; t < nthr; t++)
            if (thr[t].state == RUN) {
                cur = t;
                threadIdx = dim3((unsigned)t, 0, 0);
                swapcontext(&sched, &thr[t].ctx);
            }
        bool released = false, alive = false;
        for (int w = 0; w < (nthr + 31) / 32; w++) {
            int waiting = 0, live = 0;
            for (int t = w * 32; t < std::min(nthr, w * 32 + 32); t++)
                if (thr[t].state != DONE) live++, waiting += thr[t].state == WWARP;
            if (live && waiting == live) {
                for (int t = w * 32; t < std::min(nthr, w * 32 + 32); t++)
                    if (thr[t].state == WWARP) thr[t].state = RUN;
                released = true;
            }
        }
        if (released) continue;
        int live = 0, wb = 0;
        for (int t = 0; t < nthr; t++)
            if (thr[t].state != DONE) live++, wb += thr[t].state == WBLOCK, alive = true;
        if (!alive) return;
        if (wb == live) {
            for (int t = 0; t < nthr; t++)
                if (thr[t].state == WBLOCK) thr[t].state = RUN;
            continue;
        }
        fprintf(stderr, "EMU DEADLOCK: block (%u,%u,%u) live %d waiting-block %d\n", blockIdx.x,
                blockIdx.y, blockIdx.z, live, wb);
        abort();
    }
}
inline void run_grid(const Cfg &c, std::function<void()> fn) {
    body = &fn;
    blockDim = c.b, gridDim = c.g;
    std::vector<unsigned char> smem(c.smem + 256);
    unsigned char *base = (unsigned char *)(((uintptr_t)smem.data() + 127) & ~(uintptr_t)127);
    for (unsigned z = 0; z < c.g.z; z++)
        for (unsigned y = 0; y < c.g.y; y++)
            for (unsigned x = 0; x < c.g.x; x++) {
                blockIdx = dim3(x, y, z);
                memset(base, 0xFF, c.smem); // garbage, as on a GPU
                emu_dyn_smem = base;
                run_block(c);
            }
}
template <class K> struct Launcher {
    K k;
    Cfg c;
    template <class... A> void operator()(A... a) {
        run_grid(c, [&]() { k(a...); });
    }
};
template <class K> Launcher<K> launch(K k, Cfg c) { return {k, c}; }
} // namespace emu
inline void __syncthreads() { emu::yield(emu::WBLOCK); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::yield(emu::WWARP); }
inline float __shfl_xor_sync(unsigned, float v, int m) {
    int t = emu::cur;
    emu::shfl_slots[t] = v;
    __syncwarp();
    float r = emu::shfl_slots[(t & ~31) | ((t & 31) ^ m)];
    __syncwarp();
    return r;
}
inline float atomicAdd(float *p, float v) { float o = *p; *p = o + v; return o; }
