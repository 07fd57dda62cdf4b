// Runtime CPU dispatch for the hot CPU loops: GCC/Clang compile the marked
// function three times (x86-64-v4 = AVX-512, x86-64-v3 = AVX2 + FMA, and the
// baseline) and pick one
// when the library loads, so the wheel runs anywhere yet auto-vectorises
// 8 lanes wide on current CPUs. The clone follows the CPU alone; loops that
// must also honour a forced level (JEM_EXT_CPU_LEVEL) dispatch through
// cpu_level.h instead.
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(JEM_EXT_NO_CLONES)
#define JEM_EXT_VECTORIZE \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define JEM_EXT_VECTORIZE
#endif
