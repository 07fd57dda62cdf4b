// Exhaustive check of the vector Box-Muller (csrc/cpu/sgld_cpu.cpp) against
// the scalar definition (csrc/philox.h), built and run by
// tests/test_cpu_levels.py::test_vector_box_muller_every_word:
//  - the sine and cosine of every angle word's 24 bits k = r >> 8 (each with
//    three low bytes), where the vector code takes the quarter turn from the
//    bits instead of float conversions;
//  - both normals for every radius word's 24 bits, the angle word mixed.
// Prints one line per level and exits 1 on any difference in the bits.
#include "cpu/sgld_cpu.cpp"  // NOLINT: the file's internal functions

#include <cstdio>

namespace {
using namespace jem_ext;

struct Count {
  long checked = 0, differ = 0;
};

bool same(float a, float b) {
  return float_to_bits(a) == float_to_bits(b);
}

uint32_t angle_word(uint32_t k, uint32_t low) {
  return (k << 8) | (low & 0xffu);
}

// A cheap mix for the words that are not swept (an LCG step).
uint32_t mix(uint32_t& h) {
  h = h * 1664525u + 1013904223u;
  return h;
}

JEM_EXT_TARGET_AVX512 Count check_avx512() {
  Count n;
  alignas(64) uint32_t r0[16], r1[16];
  alignas(64) float a[16], b[16];
  for (const uint32_t low : {0u, 0xffu, 0x5au}) {
    for (uint32_t k = 0; k < (1u << 24); k += 16) {
      for (int l = 0; l < 16; ++l) {
        r1[l] = angle_word(k + l, low + 17u * l);
      }
      const __m512i w = _mm512_load_si512(r1);
      __m512 s, c;
      sincos_word_avx512<1>(&w, &s, &c);
      _mm512_store_ps(a, s);
      _mm512_store_ps(b, c);
      for (int l = 0; l < 16; ++l) {
        float ws, wc;
        sincos_turn(uniform_open1(r1[l]), &ws, &wc);
        n.differ += !same(ws, a[l]) || !same(wc, b[l]);
        ++n.checked;
      }
    }
  }
  uint32_t h = 12345;
  for (uint32_t k = 0; k < (1u << 24); k += 16) {
    for (int l = 0; l < 16; ++l) {
      r0[l] = angle_word(k + l, mix(h));
      r1[l] = mix(h);
    }
    const __m512i w0 = _mm512_load_si512(r0), w1 = _mm512_load_si512(r1);
    __m512 z0, z1;
    box_muller_avx512<1>(&w0, &w1, &z0, &z1);
    _mm512_store_ps(a, z0);
    _mm512_store_ps(b, z1);
    for (int l = 0; l < 16; ++l) {
      float want0, want1;
      box_muller(r0[l], r1[l], &want0, &want1);
      n.differ += !same(want0, a[l]) || !same(want1, b[l]);
      ++n.checked;
    }
  }
  return n;
}

JEM_EXT_TARGET_AVX2 Count check_avx2() {
  Count n;
  alignas(32) uint32_t r0[8], r1[8];
  alignas(32) float a[8], b[8];
  for (const uint32_t low : {0u, 0xffu, 0x5au}) {
    for (uint32_t k = 0; k < (1u << 24); k += 8) {
      for (int l = 0; l < 8; ++l) {
        r1[l] = angle_word(k + l, low + 17u * l);
      }
      const __m256i w = _mm256_load_si256(reinterpret_cast<const __m256i*>(r1));
      __m256 s, c;
      sincos_word_avx2<1>(&w, &s, &c);
      _mm256_store_ps(a, s);
      _mm256_store_ps(b, c);
      for (int l = 0; l < 8; ++l) {
        float ws, wc;
        sincos_turn(uniform_open1(r1[l]), &ws, &wc);
        n.differ += !same(ws, a[l]) || !same(wc, b[l]);
        ++n.checked;
      }
    }
  }
  uint32_t h = 54321;
  for (uint32_t k = 0; k < (1u << 24); k += 8) {
    for (int l = 0; l < 8; ++l) {
      r0[l] = angle_word(k + l, mix(h));
      r1[l] = mix(h);
    }
    const __m256i w0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(r0));
    const __m256i w1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(r1));
    __m256 z0, z1;
    box_muller_avx2<1>(&w0, &w1, &z0, &z1);
    _mm256_store_ps(a, z0);
    _mm256_store_ps(b, z1);
    for (int l = 0; l < 8; ++l) {
      float want0, want1;
      box_muller(r0[l], r1[l], &want0, &want1);
      n.differ += !same(want0, a[l]) || !same(want1, b[l]);
      ++n.checked;
    }
  }
  return n;
}
}  // namespace

int main() {
  bool ok = true;
  const auto report = [&ok](const char* level, Count n) {
    std::printf("%s: %ld of %ld differ\n", level, n.differ, n.checked);
    ok = ok && n.differ == 0 && n.checked > 0;
  };
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")) {
    report("avx512", check_avx512());
  } else {
    std::printf("avx512: not supported by this CPU\n");
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    report("avx2", check_avx2());
  } else {
    std::printf("avx2: not supported by this CPU\n");
  }
  return ok ? 0 : 1;
}
