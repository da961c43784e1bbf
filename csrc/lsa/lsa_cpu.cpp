// Exact batched linear sum assignment on the CPU.
//
// The algorithm, its arithmetic and its tie policy are fixed by
// docs/design.md ("Solver") so that this kernel and the CUDA one
// (lsa_cuda.cu) return identical answers, not only answers of equal cost:
//   work matrix R x C (R <= C, the input read transposed through its strides
//   when N > M), costs as float (or double for float64), every sum in double;
//   warm start by column reduction (square) or row reduction (rectangular);
//   then one shortest augmenting path (Dijkstra on reduced costs, Crouse /
//   SciPy) per free row, in increasing row order, with the argmin key
//   (d[j], column assigned, j) in lexicographic order.
//
// Speed comes from the inner step (relax row i against every unscanned
// column, then argmin), which runs O(C) work per Dijkstra step:
//   * scanned columns are marked by d[j] = NaN, so a single branch-free pass
//     over all C columns needs no "scanned" mask: r < NaN and NaN < best are
//     both false, so NaN columns are neither relaxed nor picked;
//   * the pass is vectorised with AVX-512 (8 doubles) or AVX2 (4 doubles),
//     chosen at run time (VICL_FAST_LSA_ISA=scalar|avx2|avx512 forces one),
//     with a scalar version of the very same operations as the fallback;
//   * float costs are read as float (half the bandwidth) and widened exactly.
// Vector and scalar paths perform the same IEEE operations in the same order
// (no FMA, no fast-math), so every ISA returns the same bits.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

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

namespace vicl_fast {
namespace lsa {
namespace {

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
template <typename T>
StepResult relax_scalar(const T* __restrict crow, double minVal, double ui, const double* __restrict v,
                        double* __restrict d, int32_t* __restrict path, int32_t i,
                        const int32_t* __restrict row4col, int64_t C) {
  double bestd = kInf;
  int64_t bestj = -1;
  bool bestfree = false;
  for (int64_t j = 0; j < C; ++j) {
    double dj = d[j];
    const double r = ((minVal + static_cast<double>(crow[j])) - ui) - v[j];
    if (r < dj) {
      d[j] = r;
      path[j] = i;
      dj = r;
    }
    const bool fr = row4col[j] < 0;
    if (dj < bestd || (dj == bestd && fr && !bestfree)) {
      bestd = dj;
      bestj = j;
      bestfree = fr;
    }
  }
  return {bestj, bestd};
}

// Picks the best of per-lane winners with the full lexicographic key.
inline StepResult reduce_lanes(const double* bd, const int32_t* bj, unsigned bfree, int lanes) {
  double d = kInf;
  int64_t j = -1;
  bool f = false;
  for (int l = 0; l < lanes; ++l) {
    if (bj[l] < 0) continue;  // lane never saw a finite or free candidate
    const bool fl = (bfree >> l) & 1u;
    const bool better = j < 0 || bd[l] < d || (bd[l] == d && ((fl && !f) || (fl == f && bj[l] < j)));
    if (better) {
      d = bd[l];
      j = bj[l];
      f = fl;
    }
  }
  return {j, d};
}

#ifdef VICL_LSA_X86
// ----------------------------- AVX-512 -------------------------------------
#define VICL_AVX512 __attribute__((target("avx512f,avx512vl,avx512dq,avx512bw"), always_inline)) inline

VICL_AVX512 __m512d load_costs512(const float* p, __mmask8 m) {
  return _mm512_cvtps_pd(_mm256_maskz_loadu_ps(m, p));
}
VICL_AVX512 __m512d load_costs512(const double* p, __mmask8 m) { return _mm512_maskz_loadu_pd(m, p); }

// Per-lane running argmin state; two of them break the loop-carried chain.
struct Best512 {
  __m512d d;
  __m256i j;
  __mmask8 f;
};

template <typename T>
VICL_AVX512 void block512(const T* crow, const double* v, double* d, int32_t* path, const int32_t* row4col,
                          int64_t j, __mmask8 lm, __m512d vmin, __m512d vu, __m256i vi, __m256i jv,
                          Best512& b) {
  const __m512d nan = _mm512_set1_pd(std::numeric_limits<double>::quiet_NaN());
  const __m512d c = load_costs512(crow + j, lm);
  const __m512d r = _mm512_sub_pd(_mm512_sub_pd(_mm512_add_pd(vmin, c), vu), _mm512_maskz_loadu_pd(lm, v + j));
  __m512d dd = _mm512_mask_loadu_pd(nan, lm, d + j);  // lanes past C read as NaN (= scanned)
  const __mmask8 lt = _mm512_cmp_pd_mask(r, dd, _CMP_LT_OQ);
  dd = _mm512_mask_mov_pd(dd, lt, r);
  _mm512_mask_storeu_pd(d + j, lt, r);
  _mm256_mask_storeu_epi32(path + j, lt, vi);
  const __mmask8 fr = _mm256_mask_cmpeq_epi32_mask(lm, _mm256_maskz_loadu_epi32(lm, row4col + j),
                                                   _mm256_set1_epi32(-1));
  const __mmask8 better = _mm512_cmp_pd_mask(dd, b.d, _CMP_LT_OQ) |
                          (_mm512_cmp_pd_mask(dd, b.d, _CMP_EQ_OQ) & fr & static_cast<__mmask8>(~b.f));
  b.d = _mm512_mask_mov_pd(b.d, better, dd);
  b.j = _mm256_mask_mov_epi32(b.j, better, jv);
  b.f = static_cast<__mmask8>((b.f & ~better) | (better & fr));
}

template <typename T>
__attribute__((target("avx512f,avx512vl,avx512dq,avx512bw"))) StepResult relax_avx512(
    const T* __restrict crow, double minVal, double ui, const double* __restrict v, double* __restrict d,
    int32_t* __restrict path, int32_t i, const int32_t* __restrict row4col, int64_t C) {
  const __m512d vmin = _mm512_set1_pd(minVal), vu = _mm512_set1_pd(ui);
  const __m256i vi = _mm256_set1_epi32(i);
  Best512 b0{_mm512_set1_pd(kInf), _mm256_set1_epi32(-1), 0};
  Best512 b1 = b0;
  __m256i jv = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i step = _mm256_set1_epi32(8);
  int64_t j = 0;
  for (; j + 16 <= C; j += 16) {
    block512(crow, v, d, path, row4col, j, 0xFF, vmin, vu, vi, jv, b0);
    jv = _mm256_add_epi32(jv, step);
    block512(crow, v, d, path, row4col, j + 8, 0xFF, vmin, vu, vi, jv, b1);
    jv = _mm256_add_epi32(jv, step);
  }
  for (; j < C; j += 8) {
    const int64_t rem = C - j;
    const __mmask8 lm = rem >= 8 ? 0xFF : static_cast<__mmask8>((1u << rem) - 1u);
    block512(crow, v, d, path, row4col, j, lm, vmin, vu, vi, jv, b0);
    jv = _mm256_add_epi32(jv, step);
  }
  alignas(64) double bd[16];
  alignas(32) int32_t bj[16];
  _mm512_store_pd(bd, b0.d);
  _mm512_store_pd(bd + 8, b1.d);
  _mm256_store_si256(reinterpret_cast<__m256i*>(bj), b0.j);
  _mm256_store_si256(reinterpret_cast<__m256i*>(bj + 8), b1.j);
  return reduce_lanes(bd, bj, static_cast<unsigned>(b0.f) | (static_cast<unsigned>(b1.f) << 8), 16);
}

// ------------------------------ AVX2 ---------------------------------------
#define VICL_AVX2 __attribute__((target("avx2"), always_inline)) inline

VICL_AVX2 __m256d load_costs256(const float* p, __m128i m) {
  return _mm256_cvtps_pd(_mm_maskload_ps(p, m));
}
VICL_AVX2 __m256d load_costs256(const double* p, __m128i m) {
  return _mm256_maskload_pd(p, _mm256_cvtepi32_epi64(m));
}

struct Best256 {
  __m256d d;
  __m128i j;
  __m128i f;  // all-ones where the lane's best column is free
};

template <typename T>
VICL_AVX2 void block256(const T* crow, const double* v, double* d, int32_t* path, const int32_t* row4col,
                        int64_t j, __m128i lm, __m256d vmin, __m256d vu, __m128i vi, __m128i jv, Best256& b) {
  const __m256i lm64 = _mm256_cvtepi32_epi64(lm);
  const __m256d nan = _mm256_set1_pd(std::numeric_limits<double>::quiet_NaN());
  const __m256d c = load_costs256(crow + j, lm);
  const __m256d r = _mm256_sub_pd(_mm256_sub_pd(_mm256_add_pd(vmin, c), vu), _mm256_maskload_pd(v + j, lm64));
  __m256d dd = _mm256_blendv_pd(nan, _mm256_maskload_pd(d + j, lm64), _mm256_castsi256_pd(lm64));
  const __m256d lt = _mm256_cmp_pd(r, dd, _CMP_LT_OQ);
  dd = _mm256_blendv_pd(dd, r, lt);
  const __m256i lt64 = _mm256_castpd_si256(lt);
  _mm256_maskstore_pd(d + j, lt64, r);
  // Narrow the 64-bit lane mask to 32-bit lanes for path (int32).
  const __m256i narrow = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
  const __m128i lt32 = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(lt64, narrow));
  _mm_maskstore_epi32(path + j, lt32, vi);
  const __m128i fr = _mm_and_si128(_mm_cmpeq_epi32(_mm_maskload_epi32(row4col + j, lm), _mm_set1_epi32(-1)), lm);
  const __m256i fr64 = _mm256_cvtepi32_epi64(fr);
  const __m256d eq = _mm256_cmp_pd(dd, b.d, _CMP_EQ_OQ);
  const __m256d lessd = _mm256_cmp_pd(dd, b.d, _CMP_LT_OQ);
  const __m256i bf64 = _mm256_cvtepi32_epi64(b.f);
  const __m256i better64 = _mm256_or_si256(
      _mm256_castpd_si256(lessd), _mm256_andnot_si256(bf64, _mm256_and_si256(_mm256_castpd_si256(eq), fr64)));
  b.d = _mm256_blendv_pd(b.d, dd, _mm256_castsi256_pd(better64));
  // 64-bit lane mask -> 32-bit lane mask: take the low halves.
  const __m128i better32 = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(better64, narrow));
  b.j = _mm_blendv_epi8(b.j, jv, better32);
  b.f = _mm_blendv_epi8(b.f, fr, better32);
}

template <typename T>
__attribute__((target("avx2"))) StepResult relax_avx2(const T* __restrict crow, double minVal, double ui,
                                                       const double* __restrict v, double* __restrict d,
                                                       int32_t* __restrict path, int32_t i,
                                                       const int32_t* __restrict row4col, int64_t C) {
  const __m256d vmin = _mm256_set1_pd(minVal), vu = _mm256_set1_pd(ui);
  const __m128i vi = _mm_set1_epi32(i);
  const __m128i all = _mm_set1_epi32(-1);
  Best256 b0{_mm256_set1_pd(kInf), _mm_set1_epi32(-1), _mm_setzero_si128()};
  Best256 b1 = b0;
  __m128i jv = _mm_setr_epi32(0, 1, 2, 3);
  const __m128i step = _mm_set1_epi32(4);
  int64_t j = 0;
  for (; j + 8 <= C; j += 8) {
    block256(crow, v, d, path, row4col, j, all, vmin, vu, vi, jv, b0);
    jv = _mm_add_epi32(jv, step);
    block256(crow, v, d, path, row4col, j + 4, all, vmin, vu, vi, jv, b1);
    jv = _mm_add_epi32(jv, step);
  }
  for (; j < C; j += 4) {
    const int64_t rem = C - j;
    const __m128i lm = _mm_cmpgt_epi32(_mm_set1_epi32(static_cast<int>(std::min<int64_t>(rem, 4))),
                                       _mm_setr_epi32(0, 1, 2, 3));
    block256(crow, v, d, path, row4col, j, lm, vmin, vu, vi, jv, b0);
    jv = _mm_add_epi32(jv, step);
  }
  alignas(32) double bd[8];
  alignas(16) int32_t bj[8];
  alignas(16) int32_t bf[8];
  _mm256_store_pd(bd, b0.d);
  _mm256_store_pd(bd + 4, b1.d);
  _mm_store_si128(reinterpret_cast<__m128i*>(bj), b0.j);
  _mm_store_si128(reinterpret_cast<__m128i*>(bj + 4), b1.j);
  _mm_store_si128(reinterpret_cast<__m128i*>(bf), b0.f);
  _mm_store_si128(reinterpret_cast<__m128i*>(bf + 4), b1.f);
  unsigned fbits = 0;
  for (int l = 0; l < 8; ++l) fbits |= (bf[l] != 0 ? 1u : 0u) << l;
  return reduce_lanes(bd, bj, fbits, 8);
}
#endif  // VICL_LSA_X86

// ---------------------------------------------------------------------------
// ISA selection (once per process).
// ---------------------------------------------------------------------------
enum class Isa { kScalar, kAvx2, kAvx512 };

Isa detect_isa() {
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

Isa isa() {
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
  template <typename T>
  std::vector<T>& buffer();
};
template <>
std::vector<float>& Workspace::buffer<float>() { return buf_f; }
template <>
std::vector<double>& Workspace::buffer<double>() { return buf_d; }

// Validation fused with the warm start (design steps 2 and 3). Reads every
// entry once, row by row. Returns kOk, kInvalid (NaN or -inf, takes precedence)
// or kInfeasible (an all-+inf column, square; an all-+inf row, rectangular).
template <typename T>
int warm_start(const T* c, int64_t ldc, int64_t R, int64_t C, Workspace& ws) {
  bool bad = false;
  if (R == C) {
    // Column reduction: v[j] = min_i c[i][j], first[j] = lowest row attaining it.
    double* v = ws.v.data();
    int32_t* first = ws.first.data();
    std::fill(v, v + C, kInf);
    std::fill(first, first + C, -1);
    for (int64_t i = 0; i < R; ++i) {
      const T* row = c + i * ldc;
      for (int64_t j = 0; j < C; ++j) {
        const double x = static_cast<double>(row[j]);
        bad |= !(x > -kInf);  // NaN or -inf
        if (x < v[j]) {
          v[j] = x;
          first[j] = static_cast<int32_t>(i);
        }
      }
    }
    if (bad) return kInvalid;
    for (int64_t j = 0; j < C; ++j) {
      if (first[j] < 0) return kInfeasible;  // a column of +inf (v stays +inf)
      const int32_t r = first[j];
      if (ws.col4row[r] < 0) {
        ws.col4row[r] = static_cast<int32_t>(j);
        ws.row4col[j] = r;
      }
    }
  } else {
    // Row reduction: u[i] = min_j c[i][j], first[i] = lowest column attaining it; v = 0.
    double* u = ws.u.data();
    int32_t* first = ws.first.data();
    for (int64_t i = 0; i < R; ++i) {
      const T* row = c + i * ldc;
      double m = kInf;
      int32_t a = -1;
      for (int64_t j = 0; j < C; ++j) {
        const double x = static_cast<double>(row[j]);
        bad |= !(x > -kInf);
        if (x < m) {
          m = x;
          a = static_cast<int32_t>(j);
        }
      }
      u[i] = m;
      first[i] = a;
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
  const int st = warm_start(c, ldc, R, C, ws);
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

// Copies matrix b into the per-thread buffer in work layout (R x C, row-major),
// converting to the compute type and negating for maximize.
template <typename S, typename T>
void copy_work(const S* x, int64_t wr, int64_t wc, int64_t R, int64_t C, bool negate, std::vector<T>& buf) {
  buf.resize(static_cast<size_t>(R * C));
  T* out = buf.data();
  constexpr int64_t kTile = 32;  // tiles keep a transposed read cache-friendly
  for (int64_t i0 = 0; i0 < R; i0 += kTile) {
    const int64_t i1 = std::min(R, i0 + kTile);
    for (int64_t j0 = 0; j0 < C; j0 += kTile) {
      const int64_t j1 = std::min(C, j0 + kTile);
      for (int64_t i = i0; i < i1; ++i) {
        for (int64_t j = j0; j < j1; ++j) {
          const T val = static_cast<T>(static_cast<float>(x[i * wr + j * wc]));
          out[i * C + j] = negate ? -val : val;
        }
      }
    }
  }
}
template <>
void copy_work<double, double>(const double* x, int64_t wr, int64_t wc, int64_t R, int64_t C, bool negate,
                               std::vector<double>& buf) {
  buf.resize(static_cast<size_t>(R * C));
  double* out = buf.data();
  constexpr int64_t kTile = 32;
  for (int64_t i0 = 0; i0 < R; i0 += kTile) {
    const int64_t i1 = std::min(R, i0 + kTile);
    for (int64_t j0 = 0; j0 < C; j0 += kTile) {
      const int64_t j1 = std::min(C, j0 + kTile);
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t j = j0; j < j1; ++j) {
          const double val = x[i * wr + j * wc];
          out[i * C + j] = negate ? -val : val;
        }
    }
  }
}

// Solves cost[b0:b1] of a (B, N, M) tensor whose data has element type S,
// computing in T (float, or double for float64 input).
template <typename S, typename T>
void solve_range(const at::Tensor& cost, bool maximize, int64_t b0, int64_t b1, int64_t* rows, int64_t* cols,
                 int32_t* status) {
  const int64_t N = cost.size(1), M = cost.size(2);
  const bool transposed = N > M;
  const int64_t R = std::min(N, M), C = std::max(N, M);
  const int64_t sb = cost.stride(0), sn = cost.stride(1), sm = cost.stride(2);
  const int64_t wr = transposed ? sm : sn, wc = transposed ? sn : sm;  // work-matrix strides
  const S* base = cost.const_data_ptr<S>();
  const bool direct = std::is_same<S, T>::value && !maximize && (wc == 1 || C == 1);
  const Isa which = isa();
  Workspace ws;
  for (int64_t b = b0; b < b1; ++b) {
    const S* x = base + b * sb;
    int st;
    if (direct) {
      st = solve<T>(reinterpret_cast<const T*>(x), wr, R, C, ws, which);
    } else {
      std::vector<T>& buf = ws.buffer<T>();
      copy_work<S, T>(x, wr, wc, R, C, maximize, buf);
      st = solve<T>(buf.data(), C, R, C, ws, which);
    }
    status[b] = st;
    int64_t* ro = rows + b * R;
    int64_t* co = cols + b * R;
    if (st != kOk) {
      std::fill(ro, ro + R, -1);
      std::fill(co, co + R, -1);
    } else if (!transposed) {
      for (int64_t i = 0; i < R; ++i) {
        ro[i] = i;
        co[i] = ws.col4row[i];
      }
    } else {
      // Work rows are original columns, work columns original rows: emit the
      // pairs sorted by original row (= work column).
      int64_t k = 0;
      for (int64_t j = 0; j < C; ++j) {
        const int32_t r = ws.row4col[j];
        if (r >= 0) {
          ro[k] = j;
          co[k] = r;
          ++k;
        }
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_sum_assignment_cpu(const at::Tensor& cost, bool maximize) {
  TORCH_CHECK(cost.dim() == 3, "vicl_fast::linear_sum_assignment: cost must be (B, N, M), got ", cost.dim(),
              "-D");
  TORCH_CHECK(cost.device().is_cpu(), "vicl_fast::linear_sum_assignment (CPU kernel): cost is on ", cost.device());
  const auto dt = cost.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              "vicl_fast::linear_sum_assignment: cost must be float16/bfloat16/float32/float64, got ", dt);
  const int64_t B = cost.size(0), N = cost.size(1), M = cost.size(2);
  const int64_t K = std::min(N, M);
  TORCH_CHECK(std::max(N, M) < std::numeric_limits<int32_t>::max(), "linear_sum_assignment: matrix too large");
  auto opts = cost.options().dtype(at::kLong);
  at::Tensor rows = at::empty({B, K}, opts);
  at::Tensor cols = at::empty({B, K}, opts);
  at::Tensor status = at::zeros({B}, opts.dtype(at::kInt));
  if (B == 0) return {rows, cols, status};
  int64_t* rp = rows.data_ptr<int64_t>();
  int64_t* cp = cols.data_ptr<int64_t>();
  int32_t* sp = status.data_ptr<int32_t>();
  // One matrix per task: matrices are independent and each is O(N^2..N^3).
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    switch (dt) {
      case at::kFloat: solve_range<float, float>(cost, maximize, b0, b1, rp, cp, sp); break;
      case at::kDouble: solve_range<double, double>(cost, maximize, b0, b1, rp, cp, sp); break;
      case at::kHalf: solve_range<at::Half, float>(cost, maximize, b0, b1, rp, cp, sp); break;
      default: solve_range<at::BFloat16, float>(cost, maximize, b0, b1, rp, cp, sp); break;
    }
  });
  return {rows, cols, status};
}

}  // namespace
}  // namespace lsa
}  // namespace vicl_fast

TORCH_LIBRARY_IMPL(vicl_fast, CPU, m) {
  m.impl("linear_sum_assignment", &vicl_fast::lsa::linear_sum_assignment_cpu);
}
