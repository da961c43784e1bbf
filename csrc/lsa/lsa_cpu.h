// Torch-free core of the CPU linear-sum-assignment solver (see lsa_cpu.cpp
// and docs/design.md "Solver"). Kept in a header so that it can be driven by
// a standalone micro-benchmark without ATen.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define VICL_LSA_X86 1
#endif

// GCC 12's AVX-512 reduce intrinsics trip -Wuninitialized inside its own headers.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace vicl_fast {
namespace lsa {
namespace detail {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr int kOk = 0, kInvalid = 1, kInfeasible = 2;

// Result of one relax-and-argmin step: the chosen column and its distance.
struct StepResult {
  int64_t j;
  double d;
};

// ---------------------------------------------------------------------------
// One Dijkstra step (scalar reference of the vector kernels below).
//   for every column j not yet scanned (d[j] is not NaN):
//     r = ((minVal + c[i][j]) - u[i]) - v[j];  if r < d[j]: d[j] = r, path[j] = i
//   return the column of smallest key (d[j], row4col[j] != -1, j).
// ---------------------------------------------------------------------------
// Final tie rule of the vector kernels: jm is the lowest column with d == m,
// mf the smallest d over free columns. Only when a free column ties with the
// minimum but jm is assigned do we look for the lowest free column at m (rare).
inline StepResult finish_argmin(const double* d, const int32_t* row4col, int64_t C, double m, double mf,
                                int64_t jm) {
  if (mf == m && row4col[jm] >= 0) {
    for (int64_t k = 0; k < C; ++k) {
      if (d[k] == m && row4col[k] < 0) {
        jm = k;
        break;
      }
    }
  }
  return {jm, d[jm]};
}

template <typename T>
StepResult relax_scalar(const T* __restrict crow, double minVal, double ui, const double* __restrict v,
                        double* __restrict d, int32_t* __restrict path, int32_t i,
                        const int32_t* __restrict row4col, int64_t C) {
  // Same bookkeeping as the vector kernels: the smallest d and the lowest
  // column attaining it, plus the smallest d over free columns; then
  // finish_argmin applies the free-column tie rule.
  double m = kInf, mf = kInf;
  int64_t jm = -1;
  for (int64_t j = 0; j < C; ++j) {
    const double dj = d[j];
    const double r = ((minVal + static_cast<double>(crow[j])) - ui) - v[j];
    const bool lt = r < dj;  // false for scanned (NaN) columns
    const double dn = lt ? r : dj;
    d[j] = dn;
    path[j] = lt ? i : path[j];
    if (dn < m) {
      m = dn;
      jm = j;
    }
    mf = (row4col[j] < 0 && dn < mf) ? dn : mf;
  }
  if (!(m < kInf)) return {-1, kInf};
  return finish_argmin(d, row4col, C, m, mf, jm);
}

#ifdef VICL_LSA_X86
// ----------------------------- AVX-512 -------------------------------------
#define VICL_AVX512 __attribute__((target("avx512f,avx512vl,avx512dq,avx512bw"), always_inline)) inline

VICL_AVX512 __m512d load_costs512(const float* p, __mmask8 m) {
  return _mm512_cvtps_pd(_mm256_maskz_loadu_ps(m, p));
}
VICL_AVX512 __m512d load_costs512(const double* p, __mmask8 m) { return _mm512_maskz_loadu_pd(m, p); }

// Single pass with cheap per-lane state: lane minimum of d and the first
// column attaining it (strict <, so the lowest index wins within a lane), and
// the lane minimum over free columns. vminpd returns its second operand when
// the first is NaN and NaN < x is false, so scanned columns drop out.
struct Acc512 {
  __m512d d;   // per-lane min of d
  __m256i j;   // per-lane first column attaining it
  __m512d df;  // per-lane min of d over free columns
};

template <typename T>
VICL_AVX512 void relax_block512(const T* crow, const double* v, double* d, int32_t* path, const int32_t* row4col,
                                int64_t j, __mmask8 lm, __m512d vmin, __m512d vu, __m256i vi, __m256i jv,
                                Acc512& a) {
  const __m512d nan = _mm512_set1_pd(std::numeric_limits<double>::quiet_NaN());
  const __m512d c = load_costs512(crow + j, lm);
  const __m512d r = _mm512_sub_pd(_mm512_sub_pd(_mm512_add_pd(vmin, c), vu), _mm512_maskz_loadu_pd(lm, v + j));
  __m512d dd = _mm512_mask_loadu_pd(nan, lm, d + j);  // lanes past C read as NaN (= scanned)
  const __mmask8 lt = _mm512_cmp_pd_mask(r, dd, _CMP_LT_OQ);
  dd = _mm512_mask_mov_pd(dd, lt, r);
  _mm512_mask_storeu_pd(d + j, lt, r);
  _mm256_mask_storeu_epi32(path + j, lt, vi);
  const __mmask8 better = _mm512_cmp_pd_mask(dd, a.d, _CMP_LT_OQ);
  a.d = _mm512_mask_mov_pd(a.d, better, dd);
  a.j = _mm256_mask_mov_epi32(a.j, better, jv);
  const __mmask8 fr = _mm256_cmpeq_epi32_mask(_mm256_maskz_loadu_epi32(lm, row4col + j), _mm256_set1_epi32(-1));
  a.df = _mm512_mask_min_pd(a.df, fr, dd, a.df);
}

template <typename T>
__attribute__((target("avx512f,avx512vl,avx512dq,avx512bw"))) StepResult relax_avx512(
    const T* __restrict crow, double minVal, double ui, const double* __restrict v, double* __restrict d,
    int32_t* __restrict path, int32_t i, const int32_t* __restrict row4col, int64_t C) {
  const __m512d vmin = _mm512_set1_pd(minVal), vu = _mm512_set1_pd(ui);
  const __m256i vi = _mm256_set1_epi32(i);
  const __m256i step = _mm256_set1_epi32(8);
  Acc512 a0{_mm512_set1_pd(kInf), _mm256_set1_epi32(std::numeric_limits<int32_t>::max()), _mm512_set1_pd(kInf)};
  Acc512 a1 = a0;
  __m256i jv = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  int64_t j = 0;
  for (; j + 16 <= C; j += 16) {
    relax_block512(crow, v, d, path, row4col, j, 0xFF, vmin, vu, vi, jv, a0);
    jv = _mm256_add_epi32(jv, step);
    relax_block512(crow, v, d, path, row4col, j + 8, 0xFF, vmin, vu, vi, jv, a1);
    jv = _mm256_add_epi32(jv, step);
  }
  for (; j < C; j += 8) {
    const int64_t rem = C - j;
    const __mmask8 lm = rem >= 8 ? 0xFF : static_cast<__mmask8>((1u << rem) - 1u);
    relax_block512(crow, v, d, path, row4col, j, lm, vmin, vu, vi, jv, a0);
    jv = _mm256_add_epi32(jv, step);
  }
  const double m = _mm512_reduce_min_pd(_mm512_min_pd(a0.d, a1.d));
  if (!(m < kInf)) return {-1, kInf};
  const __m512d vm = _mm512_set1_pd(m);
  // Lowest column with d == m: the smallest per-lane first index among lanes at m.
  const __mmask16 at_m = static_cast<__mmask16>(_mm512_cmp_pd_mask(a0.d, vm, _CMP_EQ_OQ) |
                                                (_mm512_cmp_pd_mask(a1.d, vm, _CMP_EQ_OQ) << 8));
  const __m512i idx = _mm512_inserti64x4(_mm512_castsi256_si512(a0.j), a1.j, 1);
  int64_t jm = _mm512_mask_reduce_min_epi32(at_m, idx);
  const double mf = _mm512_reduce_min_pd(_mm512_min_pd(a0.df, a1.df));
  return finish_argmin(d, row4col, C, m, mf, jm);
}

// ------------------------------ AVX2 ---------------------------------------
#define VICL_AVX2 __attribute__((target("avx2"), always_inline)) inline

VICL_AVX2 __m256d load_costs256(const float* p, __m128i m) {
  return _mm256_cvtps_pd(_mm_maskload_ps(p, m));
}
VICL_AVX2 __m256d load_costs256(const double* p, __m128i m) {
  return _mm256_maskload_pd(p, _mm256_cvtepi32_epi64(m));
}
VICL_AVX2 __m256d load_costs256_full(const float* p) { return _mm256_cvtps_pd(_mm_loadu_ps(p)); }
VICL_AVX2 __m256d load_costs256_full(const double* p) { return _mm256_loadu_pd(p); }

// Same scheme as AVX-512 with 4 lanes; column indices kept in 64-bit lanes so
// that the double compare masks apply to them directly.
struct Acc256 {
  __m256d d;
  __m256i j;  // int64 lanes
  __m256d df;
};

template <typename T, bool kFull>
VICL_AVX2 void relax_block256(const T* crow, const double* v, double* d, int32_t* path, const int32_t* row4col,
                              int64_t j, __m128i lm, __m256d vmin, __m256d vu, __m128i vi, __m256i jv, Acc256& a) {
  const __m256i narrow = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
  __m256d c, vj, dd;
  __m128i r4c;
  __m256i lm64 = _mm256_setzero_si256();
  if (kFull) {
    c = load_costs256_full(crow + j);
    vj = _mm256_loadu_pd(v + j);
    dd = _mm256_loadu_pd(d + j);
    r4c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row4col + j));
  } else {
    lm64 = _mm256_cvtepi32_epi64(lm);
    c = load_costs256(crow + j, lm);
    vj = _mm256_maskload_pd(v + j, lm64);
    dd = _mm256_blendv_pd(_mm256_set1_pd(std::numeric_limits<double>::quiet_NaN()), _mm256_maskload_pd(d + j, lm64),
                          _mm256_castsi256_pd(lm64));  // lanes past C read as NaN (= scanned)
    r4c = _mm_maskload_epi32(row4col + j, lm);
  }
  const __m256d r = _mm256_sub_pd(_mm256_sub_pd(_mm256_add_pd(vmin, c), vu), vj);
  const __m256d lt = _mm256_cmp_pd(r, dd, _CMP_LT_OQ);
  dd = _mm256_blendv_pd(dd, r, lt);
  const __m128i lt32 = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(_mm256_castpd_si256(lt), narrow));
  if (kFull) {
    _mm256_storeu_pd(d + j, dd);  // unchanged lanes rewrite their own value (NaN stays NaN)
    __m128i* pp = reinterpret_cast<__m128i*>(path + j);
    _mm_storeu_si128(pp, _mm_blendv_epi8(_mm_loadu_si128(pp), vi, lt32));
  } else {
    _mm256_maskstore_pd(d + j, _mm256_castpd_si256(lt), r);
    _mm_maskstore_epi32(path + j, lt32, vi);
  }
  const __m256d better = _mm256_cmp_pd(dd, a.d, _CMP_LT_OQ);
  a.d = _mm256_blendv_pd(a.d, dd, better);
  a.j = _mm256_castpd_si256(_mm256_blendv_pd(_mm256_castsi256_pd(a.j), _mm256_castsi256_pd(jv), better));
  const __m256d fr = _mm256_castsi256_pd(_mm256_cvtepi32_epi64(_mm_cmpeq_epi32(r4c, _mm_set1_epi32(-1))));
  a.df = _mm256_blendv_pd(a.df, _mm256_min_pd(dd, a.df), fr);
}

template <typename T>
__attribute__((target("avx2"))) StepResult relax_avx2(const T* __restrict crow, double minVal, double ui,
                                                       const double* __restrict v, double* __restrict d,
                                                       int32_t* __restrict path, int32_t i,
                                                       const int32_t* __restrict row4col, int64_t C) {
  const __m256d vmin = _mm256_set1_pd(minVal), vu = _mm256_set1_pd(ui);
  const __m128i vi = _mm_set1_epi32(i);
  const __m128i all = _mm_set1_epi32(-1);
  Acc256 a0{_mm256_set1_pd(kInf), _mm256_set1_epi64x(std::numeric_limits<int64_t>::max()), _mm256_set1_pd(kInf)};
  Acc256 a1 = a0;
  __m256i jv = _mm256_setr_epi64x(0, 1, 2, 3);
  const __m256i step = _mm256_set1_epi64x(4);
  int64_t j = 0;
  for (; j + 8 <= C; j += 8) {
    relax_block256<T, true>(crow, v, d, path, row4col, j, all, vmin, vu, vi, jv, a0);
    jv = _mm256_add_epi64(jv, step);
    relax_block256<T, true>(crow, v, d, path, row4col, j + 4, all, vmin, vu, vi, jv, a1);
    jv = _mm256_add_epi64(jv, step);
  }
  for (; j < C; j += 4) {
    const int64_t rem = C - j;
    const __m128i lm = _mm_cmpgt_epi32(_mm_set1_epi32(static_cast<int>(std::min<int64_t>(rem, 4))),
                                       _mm_setr_epi32(0, 1, 2, 3));
    relax_block256<T, false>(crow, v, d, path, row4col, j, lm, vmin, vu, vi, jv, a0);
    jv = _mm256_add_epi64(jv, step);
  }
  alignas(32) double bd[8], bf[8];
  alignas(32) int64_t bj[8];
  _mm256_store_pd(bd, a0.d);
  _mm256_store_pd(bd + 4, a1.d);
  _mm256_store_pd(bf, a0.df);
  _mm256_store_pd(bf + 4, a1.df);
  _mm256_store_si256(reinterpret_cast<__m256i*>(bj), a0.j);
  _mm256_store_si256(reinterpret_cast<__m256i*>(bj + 4), a1.j);
  double m = kInf, mf = kInf;
  for (int l = 0; l < 8; ++l) {
    m = bd[l] < m ? bd[l] : m;
    mf = bf[l] < mf ? bf[l] : mf;
  }
  if (!(m < kInf)) return {-1, kInf};
  int64_t jm = std::numeric_limits<int64_t>::max();
  for (int l = 0; l < 8; ++l)
    if (bd[l] == m && bj[l] < jm) jm = bj[l];
  return finish_argmin(d, row4col, C, m, mf, jm);
}
#endif  // VICL_LSA_X86

// ---------------------------------------------------------------------------
// ISA selection (once per process).
// ---------------------------------------------------------------------------
enum class Isa { kScalar, kAvx2, kAvx512 };

inline Isa detect_isa() {
  const char* env = std::getenv("VICL_FAST_LSA_ISA");
  const std::string want = env ? env : "auto";
#ifdef VICL_LSA_X86
  __builtin_cpu_init();
  const bool has512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw");
  const bool has2 = __builtin_cpu_supports("avx2");
  if (want == "scalar") return Isa::kScalar;
  if (want == "avx2") return has2 ? Isa::kAvx2 : Isa::kScalar;
  if (has512 && want != "avx2") return Isa::kAvx512;
  if (has2) return Isa::kAvx2;
#endif
  (void)want;
  return Isa::kScalar;
}

inline Isa isa() {
  static const Isa value = detect_isa();
  return value;
}

template <typename T>
inline StepResult relax(Isa which, const T* crow, double minVal, double ui, const double* v, double* d,
                        int32_t* path, int32_t i, const int32_t* row4col, int64_t C) {
#ifdef VICL_LSA_X86
  if (which == Isa::kAvx512) return relax_avx512<T>(crow, minVal, ui, v, d, path, i, row4col, C);
  if (which == Isa::kAvx2) return relax_avx2<T>(crow, minVal, ui, v, d, path, i, row4col, C);
#endif
  (void)which;
  return relax_scalar<T>(crow, minVal, ui, v, d, path, i, row4col, C);
}

#ifdef VICL_LSA_STATS
inline long g_lsa_steps = 0;  // micro-benchmark instrumentation only
#endif

// Per-thread scratch, reused across the matrices of a chunk.
struct Workspace {
  std::vector<double> u, v, d, scanned_d;
  std::vector<int32_t> path, row4col, col4row, scanned_col, first;
  std::vector<float> buf_f;
  std::vector<double> buf_d;

  void resize(int64_t R, int64_t C) {
    u.assign(R, 0.0);
    v.assign(C, 0.0);
    d.resize(C);
    scanned_d.resize(C);
    scanned_col.resize(C);
    path.resize(C);
    row4col.assign(C, -1);
    col4row.assign(R, -1);
    first.resize(std::max(R, C));
  }
  std::vector<float> colmin_f;
  std::vector<double> colmin_d;
  template <typename T>
  std::vector<T>& buffer();
  template <typename T>
  std::vector<T>& colmin();
};
template <>
inline std::vector<float>& Workspace::buffer<float>() { return buf_f; }
template <>
inline std::vector<double>& Workspace::buffer<double>() { return buf_d; }
template <>
inline std::vector<float>& Workspace::colmin<float>() { return colmin_f; }
template <>
inline std::vector<double>& Workspace::colmin<double>() { return colmin_d; }

// ---------------------------------------------------------------------------
// Warm-start reductions. Strict < in increasing index order, so the lowest
// index attaining the minimum wins (and its exact bits are the minimum); the
// vector versions keep one such running minimum per column / lane.
// ---------------------------------------------------------------------------

// Column reduction over rows 0..R-1: vt[j] = min_i c[i][j], first[j] = the
// lowest row attaining it (vt = +inf, first = -1 on entry). True if any entry
// is NaN or -inf.
template <typename T>
__attribute__((always_inline)) inline bool col_reduce_generic(const T* c, int64_t ldc, int64_t R, int64_t C, T* vt,
                                                              int32_t* first) {
  bool bad = false;
  for (int64_t i = 0; i < R; ++i) {
    const T* row = c + i * ldc;
    for (int64_t j = 0; j < C; ++j) {  // branch-free so that it vectorises
      const T x = row[j];
      bad |= !(x > -std::numeric_limits<T>::infinity());
      const bool lt = x < vt[j];
      vt[j] = lt ? x : vt[j];
      first[j] = lt ? static_cast<int32_t>(i) : first[j];
    }
  }
  return bad;
}

template <typename T>
bool col_reduce_scalar(const T* c, int64_t ldc, int64_t R, int64_t C, T* vt, int32_t* first) {
  return col_reduce_generic(c, ldc, R, C, vt, first);
}

// Row minimum (lowest column attaining it is found by the caller). Sets bad on NaN or -inf.
template <typename T>
T row_min_scalar(const T* row, int64_t C, bool& bad) {
  T m = std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < C; ++j) {
    const T x = row[j];
    bad |= !(x > -std::numeric_limits<T>::infinity());
    if (x < m) m = x;
  }
  return m;
}

#ifdef VICL_LSA_X86
// AVX2 column reduction: full 8-float / 4-double blocks in vectors, the rest scalar.
__attribute__((target("avx2"))) inline bool col_reduce_avx2(const float* c, int64_t ldc, int64_t R, int64_t C,
                                                            float* vt, int32_t* first) {
  const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 badv = _mm256_setzero_ps();
  bool bad = false;
  const int64_t C8 = C & ~int64_t{7};
  for (int64_t i = 0; i < R; ++i) {
    const float* row = c + i * ldc;
    const __m256i vi = _mm256_set1_epi32(static_cast<int32_t>(i));
    for (int64_t j = 0; j < C8; j += 8) {
      const __m256 x = _mm256_loadu_ps(row + j);
      badv = _mm256_or_ps(badv, _mm256_cmp_ps(x, ninf, _CMP_NGT_UQ));
      const __m256 vj = _mm256_loadu_ps(vt + j);
      const __m256 lt = _mm256_cmp_ps(x, vj, _CMP_LT_OQ);
      _mm256_storeu_ps(vt + j, _mm256_blendv_ps(vj, x, lt));
      __m256i* fp = reinterpret_cast<__m256i*>(first + j);
      _mm256_storeu_si256(fp, _mm256_blendv_epi8(_mm256_loadu_si256(fp), vi, _mm256_castps_si256(lt)));
    }
    for (int64_t j = C8; j < C; ++j) {
      const float x = row[j];
      bad |= !(x > -std::numeric_limits<float>::infinity());
      if (x < vt[j]) {
        vt[j] = x;
        first[j] = static_cast<int32_t>(i);
      }
    }
  }
  return bad || _mm256_movemask_ps(badv) != 0;
}

__attribute__((target("avx2"))) inline bool col_reduce_avx2(const double* c, int64_t ldc, int64_t R, int64_t C,
                                                            double* vt, int32_t* first) {
  const __m256d ninf = _mm256_set1_pd(-kInf);
  const __m256i narrow = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
  __m256d badv = _mm256_setzero_pd();
  bool bad = false;
  const int64_t C4 = C & ~int64_t{3};
  for (int64_t i = 0; i < R; ++i) {
    const double* row = c + i * ldc;
    const __m128i vi = _mm_set1_epi32(static_cast<int32_t>(i));
    for (int64_t j = 0; j < C4; j += 4) {
      const __m256d x = _mm256_loadu_pd(row + j);
      badv = _mm256_or_pd(badv, _mm256_cmp_pd(x, ninf, _CMP_NGT_UQ));
      const __m256d vj = _mm256_loadu_pd(vt + j);
      const __m256d lt = _mm256_cmp_pd(x, vj, _CMP_LT_OQ);
      _mm256_storeu_pd(vt + j, _mm256_blendv_pd(vj, x, lt));
      const __m128i lt32 = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(_mm256_castpd_si256(lt), narrow));
      __m128i* fp = reinterpret_cast<__m128i*>(first + j);
      _mm_storeu_si128(fp, _mm_blendv_epi8(_mm_loadu_si128(fp), vi, lt32));
    }
    for (int64_t j = C4; j < C; ++j) {
      const double x = row[j];
      bad |= !(x > -kInf);
      if (x < vt[j]) {
        vt[j] = x;
        first[j] = static_cast<int32_t>(i);
      }
    }
  }
  return bad || _mm256_movemask_pd(badv) != 0;
}

__attribute__((target("avx512f,avx512vl,avx512dq,avx512bw"))) inline bool col_reduce_avx512(
    const float* c, int64_t ldc, int64_t R, int64_t C, float* vt, int32_t* first) {
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __mmask16 bad = 0;
  for (int64_t i = 0; i < R; ++i) {
    const float* row = c + i * ldc;
    const __m512i vi = _mm512_set1_epi32(static_cast<int32_t>(i));
    for (int64_t j = 0; j < C; j += 16) {
      const int64_t rem = C - j;
      const __mmask16 lm = rem >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << rem) - 1u);
      const __m512 x = _mm512_maskz_loadu_ps(lm, row + j);
      bad |= _mm512_mask_cmp_ps_mask(lm, x, ninf, _CMP_NGT_UQ);
      const __mmask16 lt = _mm512_mask_cmp_ps_mask(lm, x, _mm512_maskz_loadu_ps(lm, vt + j), _CMP_LT_OQ);
      _mm512_mask_storeu_ps(vt + j, lt, x);
      _mm512_mask_storeu_epi32(first + j, lt, vi);
    }
  }
  return bad != 0;
}

__attribute__((target("avx512f,avx512vl,avx512dq,avx512bw"))) inline bool col_reduce_avx512(
    const double* c, int64_t ldc, int64_t R, int64_t C, double* vt, int32_t* first) {
  const __m512d ninf = _mm512_set1_pd(-kInf);
  __mmask8 bad = 0;
  for (int64_t i = 0; i < R; ++i) {
    const double* row = c + i * ldc;
    const __m256i vi = _mm256_set1_epi32(static_cast<int32_t>(i));
    for (int64_t j = 0; j < C; j += 8) {
      const int64_t rem = C - j;
      const __mmask8 lm = rem >= 8 ? 0xFF : static_cast<__mmask8>((1u << rem) - 1u);
      const __m512d x = _mm512_maskz_loadu_pd(lm, row + j);
      bad |= _mm512_mask_cmp_pd_mask(lm, x, ninf, _CMP_NGT_UQ);
      const __mmask8 lt = _mm512_mask_cmp_pd_mask(lm, x, _mm512_maskz_loadu_pd(lm, vt + j), _CMP_LT_OQ);
      _mm512_mask_storeu_pd(vt + j, lt, x);
      _mm256_mask_storeu_epi32(first + j, lt, vi);
    }
  }
  return bad != 0;
}

__attribute__((target("avx512f,avx512vl,avx512dq,avx512bw"))) inline float row_min_avx512(const float* row,
                                                                                         int64_t C, bool& bad) {
  const __m512 inf = _mm512_set1_ps(std::numeric_limits<float>::infinity());
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 acc = inf;
  __mmask16 b = 0;
  for (int64_t j = 0; j < C; j += 16) {
    const int64_t rem = C - j;
    const __mmask16 lm = rem >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << rem) - 1u);
    const __m512 x = _mm512_mask_loadu_ps(inf, lm, row + j);
    b |= _mm512_cmp_ps_mask(x, ninf, _CMP_NGT_UQ);
    acc = _mm512_min_ps(x, acc);  // NaN x keeps acc (status 1 anyway)
  }
  bad |= b != 0;
  return _mm512_reduce_min_ps(acc);
}

__attribute__((target("avx512f,avx512vl,avx512dq,avx512bw"))) inline double row_min_avx512(const double* row,
                                                                                          int64_t C, bool& bad) {
  const __m512d inf = _mm512_set1_pd(kInf), ninf = _mm512_set1_pd(-kInf);
  __m512d acc = inf;
  __mmask8 b = 0;
  for (int64_t j = 0; j < C; j += 8) {
    const int64_t rem = C - j;
    const __mmask8 lm = rem >= 8 ? 0xFF : static_cast<__mmask8>((1u << rem) - 1u);
    const __m512d x = _mm512_mask_loadu_pd(inf, lm, row + j);
    b |= _mm512_cmp_pd_mask(x, ninf, _CMP_NGT_UQ);
    acc = _mm512_min_pd(x, acc);
  }
  bad |= b != 0;
  return _mm512_reduce_min_pd(acc);
}
#endif  // VICL_LSA_X86

// Validation fused with the warm start (design steps 2 and 3). Reads every
// entry once, row by row. Returns kOk, kInvalid (NaN or -inf, takes precedence)
// or kInfeasible (an all-+inf column, square; an all-+inf row, rectangular).
template <typename T>
int warm_start(const T* c, int64_t ldc, int64_t R, int64_t C, Workspace& ws, Isa which) {
  bool bad = false;
  int32_t* first = ws.first.data();
  if (R == C) {
    // Column reduction: v[j] = min_i c[i][j], first[j] = lowest row attaining it; u = 0.
    std::vector<T>& vt_buf = ws.colmin<T>();
    vt_buf.assign(C, std::numeric_limits<T>::infinity());
    T* vt = vt_buf.data();
    std::fill(first, first + C, -1);
#ifdef VICL_LSA_X86
    if (which == Isa::kAvx512) {
      bad = col_reduce_avx512(c, ldc, R, C, vt, first);
    } else if (which == Isa::kAvx2) {
      bad = col_reduce_avx2(c, ldc, R, C, vt, first);
    } else {
      bad = col_reduce_scalar(c, ldc, R, C, vt, first);
    }
#else
    bad = col_reduce_scalar(c, ldc, R, C, vt, first);
#endif
    if (bad) return kInvalid;
    double* v = ws.v.data();
    for (int64_t j = 0; j < C; ++j) {
      if (first[j] < 0) return kInfeasible;  // a column of +inf
      v[j] = static_cast<double>(vt[j]);
      const int32_t r = first[j];
      if (ws.col4row[r] < 0) {
        ws.col4row[r] = static_cast<int32_t>(j);
        ws.row4col[j] = r;
      }
    }
  } else {
    // Row reduction: u[i] = min_j c[i][j], first[i] = lowest column attaining it; v = 0.
    double* u = ws.u.data();
    for (int64_t i = 0; i < R; ++i) {
      const T* row = c + i * ldc;
      T m;
#ifdef VICL_LSA_X86
      m = (which == Isa::kAvx512) ? row_min_avx512(row, C, bad)
                                                            : row_min_scalar(row, C, bad);
#else
      m = row_min_scalar(row, C, bad);
#endif
      int32_t a = -1;
      if (m < std::numeric_limits<T>::infinity()) {
        for (int64_t j = 0; j < C; ++j) {
          if (row[j] == m) {
            a = static_cast<int32_t>(j);
            break;
          }
        }
      }
      first[i] = a;
      u[i] = a >= 0 ? static_cast<double>(row[a]) : kInf;  // the bits of the lowest column attaining it
    }
    if (bad) return kInvalid;
    for (int64_t i = 0; i < R; ++i) {
      if (first[i] < 0) return kInfeasible;  // a row of +inf
      const int32_t col = first[i];
      if (ws.row4col[col] < 0) {
        ws.row4col[col] = static_cast<int32_t>(i);
        ws.col4row[i] = col;
      }
    }
  }
  return kOk;
}

// Solves one R x C work matrix (R <= C) with rows ldc apart. On success
// ws.col4row holds the assignment. Returns the status code.
template <typename T>
int solve(const T* c, int64_t ldc, int64_t R, int64_t C, Workspace& ws, Isa which) {
  ws.resize(R, C);
  if (R == 0) return kOk;
  const int st = warm_start(c, ldc, R, C, ws, which);
  if (st != kOk) return st;
  double* u = ws.u.data();
  double* v = ws.v.data();
  double* d = ws.d.data();
  int32_t* path = ws.path.data();
  int32_t* row4col = ws.row4col.data();
  int32_t* col4row = ws.col4row.data();
  int32_t* sc = ws.scanned_col.data();
  double* sd = ws.scanned_d.data();
  const double nan = std::numeric_limits<double>::quiet_NaN();

  for (int64_t cur = 0; cur < R; ++cur) {
    if (col4row[cur] >= 0) continue;
    std::fill(d, d + C, kInf);
    double minVal = 0.0;
    int64_t i = cur;
    int64_t ns = 0;
    int64_t sink = -1;
    while (sink < 0) {
#ifdef VICL_LSA_STATS
      ++g_lsa_steps;
#endif
      const StepResult s = relax<T>(which, c + i * ldc, minVal, u[i], v, d, path, static_cast<int32_t>(i),
                                    row4col, C);
      if (!(s.d < kInf)) return kInfeasible;  // every unscanned column unreachable
      minVal = s.d;
      sc[ns] = static_cast<int32_t>(s.j);
      sd[ns] = s.d;
      ++ns;
      d[s.j] = nan;  // scanned
      if (row4col[s.j] < 0) {
        sink = s.j;
      } else {
        i = row4col[s.j];
      }
    }
    // Dual update (before augmenting: uses the old col4row / row4col).
    u[cur] += minVal;
    for (int64_t k = 0; k + 1 < ns; ++k) {  // every scanned column but the sink has a row
      const int32_t r = row4col[sc[k]];
      u[r] += minVal - sd[k];
    }
    for (int64_t k = 0; k < ns; ++k) v[sc[k]] -= minVal - sd[k];
    // Augment along the path.
    int64_t j = sink;
    while (true) {
      const int32_t r = path[j];
      row4col[j] = r;
      const int64_t prev = col4row[r];
      col4row[r] = static_cast<int32_t>(j);
      j = prev;
      if (r == cur) break;
    }
  }
  return kOk;
}

}  // namespace detail
}  // namespace lsa
}  // namespace vicl_fast

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
