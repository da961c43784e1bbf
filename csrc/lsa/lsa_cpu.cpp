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

#include <atomic>

#include "lsa_cpu.h"

namespace vicl_fast {
namespace lsa {
namespace {

using namespace detail;

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

// Solves the matrices of a (B, N, M) tensor whose data has element type S,
// computing in T (float, or double for float64 input). Matrices are handed out
// one at a time from a shared counter (dynamic schedule): their solve times
// differ by up to ~10x with the cost structure, and a thread that the OS
// deschedules (shared machines) does not hold back a fixed share of the batch.
template <typename S, typename T>
void solve_queue(const at::Tensor& cost, bool maximize, std::atomic<int64_t>& next, int64_t* rows, int64_t* cols,
                 int32_t* status) {
  const int64_t N = cost.size(1), M = cost.size(2);
  const bool transposed = N > M;
  const int64_t R = std::min(N, M), C = std::max(N, M);
  const int64_t sb = cost.stride(0), sn = cost.stride(1), sm = cost.stride(2);
  const int64_t wr = transposed ? sm : sn, wc = transposed ? sn : sm;  // work-matrix strides
  const S* base = cost.const_data_ptr<S>();
  const bool direct = std::is_same<S, T>::value && !maximize && (wc == 1 || C == 1);
  const Isa which = isa();
  const int64_t B = cost.size(0);
  Workspace ws;
  for (int64_t b = next.fetch_add(1, std::memory_order_relaxed); b < B;
       b = next.fetch_add(1, std::memory_order_relaxed)) {
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
  // Matrices are independent: one worker per thread (at most one per matrix),
  // each pulling matrices from the shared counter until the batch is done.
  std::atomic<int64_t> next{0};
  // Tiny batches stay on the calling thread: waking the pool costs more than solving.
  constexpr int64_t kEntriesPerWorker = 16384;
  const int64_t by_size = (B * N * M + kEntriesPerWorker - 1) / kEntriesPerWorker;
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>({int64_t{at::get_num_threads()}, B, by_size}));
  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      switch (dt) {
        case at::kFloat: solve_queue<float, float>(cost, maximize, next, rp, cp, sp); break;
        case at::kDouble: solve_queue<double, double>(cost, maximize, next, rp, cp, sp); break;
        case at::kHalf: solve_queue<at::Half, float>(cost, maximize, next, rp, cp, sp); break;
        default: solve_queue<at::BFloat16, float>(cost, maximize, next, rp, cp, sp); break;
      }
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
