// BITNET_FLOAT_CLONES: the float loops that carry the work (attention, the block's activation and
// residual adds, quantisation and norms) get AVX-512 and AVX2 clones besides the baseline one (GCC,
// x86-64 Linux), picked once per process by the CPU. The library is built with -ffp-contract=off and
// without fast-math, so every clone does the same IEEE operations in the same order as the baseline:
// results are bit for bit the same on every ISA and at every batch size.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define BITNET_FLOAT_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define BITNET_FLOAT_CLONES
#endif
