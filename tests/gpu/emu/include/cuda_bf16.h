// cuda_bf16.h (emulated): bfloat16 storage with round-to-nearest-even conversion.
#pragma once
#include "emu_core.h"
struct __nv_bfloat16 { uint16_t b; };
inline __nv_bfloat16 __float2bfloat16(float f) { uint32_t u; memcpy(&u, &f, 4); u += 0x7fffu + ((u >> 16) & 1u); return {(uint16_t)(u >> 16)}; }
inline float __bfloat162float(__nv_bfloat16 h) { uint32_t u = (uint32_t)h.b << 16; float f; memcpy(&f, &u, 4); return f; }
