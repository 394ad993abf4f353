// Chooses the CPU kernels once, from what the processor reports (CPUID on x86-64).
#include <fmt/format.h>

#include "cpu_kernels/kernels.hpp"
#include "packkv/error.hpp"

#if defined(__x86_64__)
#include <cpuid.h>
#endif

namespace packkv::detail::cpu {

namespace {

#if defined(__x86_64__)
bool has_avx2_fma_f16c() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return false;
  const bool fma = c & (1u << 12), osxsave = c & (1u << 27), avx = c & (1u << 28), f16c = c & (1u << 29);
  if (!(fma && osxsave && avx && f16c)) return false;
  // The operating system must save the YMM registers (XCR0 bits 1 and 2).
  unsigned xcr0_lo = 0, xcr0_hi = 0;
  __asm__("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  if ((xcr0_lo & 0x6u) != 0x6u) return false;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  return b & (1u << 5);  // AVX2
}
#endif

}  // namespace

const char* to_string(Isa isa) { return isa == Isa::avx2 ? "avx2" : "scalar"; }

bool supported(Isa isa) {
  switch (isa) {
    case Isa::scalar: return true;
    case Isa::avx2:
#if defined(__x86_64__)
    {
      static const bool avx2 = has_avx2_fma_f16c();
      return avx2;
    }
#else
      return false;
#endif
  }
  return false;
}

const Kernels& kernels_for(Isa isa) {
  PACKKV_REQUIRE(supported(isa), fmt::format("the {} CPU kernels are not supported by this processor", to_string(isa)));
#if defined(__x86_64__)
  if (isa == Isa::avx2) return kAvx2Kernels;
#endif
  return kScalarKernels;
}

const Kernels& kernels() {
  static const Kernels& best = supported(Isa::avx2) ? kernels_for(Isa::avx2) : kScalarKernels;
  return best;
}

void finish_v(const float* acc, const float* min_term, int groups, int head_dim, float* out) {
  for (int g = 0; g < groups; ++g) {
    for (int c = 0; c < head_dim; ++c) {
      const float* a = acc + (static_cast<std::size_t>(g) * head_dim + c) * 8;
      out[g * head_dim + c] = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7])) + min_term[g];
    }
  }
}

}  // namespace packkv::detail::cpu
