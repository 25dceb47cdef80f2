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
#define DCNV3_X86_DISPATCH 1
#define DCNV3_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")))
#define DCNV3_TARGET_AVX2 __attribute__((target("avx2,fma")))

namespace internimage {

enum class CpuLevel { kBaseline, kAvx2, kAvx512 };

inline CpuLevel cpu_level() {
  static const CpuLevel level = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq")) {
      return CpuLevel::kAvx512;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
      return CpuLevel::kAvx2;
    }
    return CpuLevel::kBaseline;
  }();
  return level;
}

}  // namespace internimage
#endif
