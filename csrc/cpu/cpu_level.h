// The instruction-set level of the hand-vectorised CPU loops, chosen at run
// time so one build runs on any x86-64 CPU:
//   avx512    AVX-512 F/BW/DQ/VL (with AVX2 and FMA)
//   avx2      AVX2 and FMA
//   baseline  the compiler's default target (the scalar definition of the math)
// The default is the best level the CPU supports. The environment variable
// JEM_EXT_CPU_LEVEL (read once, at the first kernel call) forces a level, for
// benchmarks and tests; asking for a level the CPU lacks is an error (a
// silent fallback would make a benchmark or test measure the wrong code).
// Every level gives bit-identical results.
#pragma once

#include <cstdlib>
#include <cstring>
#include <string>

#include <c10/util/Exception.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define JEM_EXT_X86_LEVELS 1
// Function attributes that compile one function for a level; the features
// listed here are exactly those cpu_supports() checks below.
#define JEM_EXT_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define JEM_EXT_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")))
#else
#define JEM_EXT_X86_LEVELS 0
#endif

namespace jem_ext {

enum class CpuLevel : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

constexpr const char* kCpuLevelEnv = "JEM_EXT_CPU_LEVEL";

inline const char* cpu_level_name(CpuLevel level) {
  switch (level) {
    case CpuLevel::kAvx512:
      return "avx512";
    case CpuLevel::kAvx2:
      return "avx2";
    default:
      return "baseline";
  }
}

// Whether this CPU runs the code compiled for `level`.
inline bool cpu_supports(CpuLevel level) {
#if JEM_EXT_X86_LEVELS
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
                      __builtin_cpu_supports("avx512vl");
  switch (level) {
    case CpuLevel::kAvx512:
      return avx512;
    case CpuLevel::kAvx2:
      return avx2;
    default:
      return true;
  }
#else
  return level == CpuLevel::kBaseline;
#endif
}

// The table of kernels compiled for `level`: one per level, the baseline when the build has no
// x86 levels.
template <typename Table>
const Table& for_level(CpuLevel level, const Table& baseline, const Table& avx2,
                       const Table& avx512) {
#if JEM_EXT_X86_LEVELS
  switch (level) {
    case CpuLevel::kAvx512:
      return avx512;
    case CpuLevel::kAvx2:
      return avx2;
    default:
      break;
  }
#else
  (void)level;
  (void)avx2;
  (void)avx512;
#endif
  return baseline;
}

inline CpuLevel best_cpu_level() {
  for (CpuLevel level : {CpuLevel::kAvx512, CpuLevel::kAvx2}) {
    if (cpu_supports(level)) {
      return level;
    }
  }
  return CpuLevel::kBaseline;
}

// The level named by `requested` (null or empty: the best one); throws on an
// unknown name or a level this CPU lacks.
inline CpuLevel resolve_cpu_level(const char* requested) {
  const CpuLevel best = best_cpu_level();
  if (requested == nullptr || *requested == '\0') {
    return best;
  }
  for (CpuLevel level : {CpuLevel::kAvx512, CpuLevel::kAvx2, CpuLevel::kBaseline}) {
    if (std::strcmp(requested, cpu_level_name(level)) == 0) {
      TORCH_CHECK(cpu_supports(level), kCpuLevelEnv, "=", requested,
                  ": this CPU (or this build) lacks that instruction set (the best level "
                  "available is ",
                  cpu_level_name(best), ")");
      return level;
    }
  }
  TORCH_CHECK(false, kCpuLevelEnv, "=", requested,
              ": unknown CPU level (expected avx512, avx2 or baseline)");
  return best;
}

// The level the CPU kernels run at in this process.
inline CpuLevel cpu_level() {
  static const CpuLevel level = resolve_cpu_level(std::getenv(kCpuLevelEnv));
  return level;
}

// The name of cpu_level(): the kernel of the _cpu_level op.
inline std::string cpu_level_in_use() { return cpu_level_name(cpu_level()); }

}  // namespace jem_ext
