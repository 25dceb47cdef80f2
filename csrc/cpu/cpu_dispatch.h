// Run-time instruction-set dispatch shared by the CPU kernels.
//
// Entry points are compiled once per instruction set (AVX-512, AVX2+FMA, baseline) and picked
// at run time, so channel loops use the widest vectors the CPU has while the library still
// runs on any x86-64. Only ISA flags differ between the versions (not -march), which lets GCC
// inline shared header helpers into each of them.
#pragma once

#if defined(__GNUC__) || defined(__clang__)
#define DCNV3_ALWAYS_INLINE __attribute__((always_inline)) inline
#else
#define DCNV3_ALWAYS_INLINE inline
#endif

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#include <cstdlib>
#include <cstring>

#define DCNV3_X86_DISPATCH 1
#define DCNV3_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")))
#define DCNV3_TARGET_AVX2 __attribute__((target("avx2,fma")))

namespace internimage {

enum class CpuLevel { kBaseline, kAvx2, kAvx512 };

// The widest instruction set the CPU has, capped by the environment variable
// INTERNIMAGE_CPU_ISA ("avx2" or "baseline"; read once) so that the narrower builds can be
// tested, and compared, on a machine that has AVX-512.
inline CpuLevel cpu_level() {
  static const CpuLevel level = [] {
    __builtin_cpu_init();
    CpuLevel found = CpuLevel::kBaseline;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq")) {
      found = CpuLevel::kAvx512;
    } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
      found = CpuLevel::kAvx2;
    }
    const char* cap = std::getenv("INTERNIMAGE_CPU_ISA");
    if (cap != nullptr && std::strcmp(cap, "baseline") == 0) return CpuLevel::kBaseline;
    if (cap != nullptr && std::strcmp(cap, "avx2") == 0 && found == CpuLevel::kAvx512) {
      return CpuLevel::kAvx2;
    }
    return found;
  }();
  return level;
}

}  // namespace internimage

// `return name_avx512(args...)`, `name_avx2(args...)` or `name_baseline(args...)`, whichever
// cpu_level() picks: the body of every dispatching entry point.
#define DCNV3_RETURN_DISPATCHED(name, ...)                    \
  switch (::internimage::cpu_level()) {                      \
    case ::internimage::CpuLevel::kAvx512:                   \
      return name##_avx512(__VA_ARGS__);                     \
    case ::internimage::CpuLevel::kAvx2:                     \
      return name##_avx2(__VA_ARGS__);                       \
    case ::internimage::CpuLevel::kBaseline:                 \
      break;                                                 \
  }                                                          \
  return name##_baseline(__VA_ARGS__)
#else
// Elsewhere only the baseline build exists.
#define DCNV3_RETURN_DISPATCHED(name, ...) return name##_baseline(__VA_ARGS__)
#endif
