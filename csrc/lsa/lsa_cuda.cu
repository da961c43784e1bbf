// Batched exact linear sum assignment on CUDA.
//
// The algorithm and its arithmetic are those of docs/design.md ("Solver"),
// step by step, so that the answers equal the CPU kernel's (lsa_cpu.cpp)
// index for index, not only in cost:
//   work matrix R x C (R = min(N, M) rows, C = max(N, M) columns; N > M is
//   read transposed), costs as float (half/bfloat16/float input) or double
//   (double input), every sum in double; column-reduction warm start for
//   square matrices, row reduction for rectangular ones; SciPy-order shortest
//   augmenting paths, r = ((minVal + c) - u[i]) - v[j]; argmin key
//   (d, column assigned, j) lexicographic; status 0 ok, 1 NaN/-inf, 2 infeasible.
//
// GPU mapping (see ../../docs/design.md and shared/notes/hungarian.md):
//   * one block of W warps per matrix; W = 1 up to C = 512 (no block barrier
//     at all: __syncwarp only), W = 4/8/16 up to C = 4096, then a W = 16
//     variant whose per-column state lives in global memory (any C).
//   * thread t owns columns j = t + 32*W*k, k < K: its distances d and column
//     potentials v are registers (K is a template constant; every register
//     array is indexed by unrolled constants only, so nothing goes to local
//     memory), its scanned/assigned flags are two bit masks.
//   * row state u, col4row and column state row4col, path are shared memory.
//   * cost rows are read coalesced (lane j reads column j), through the
//     read-only cache: one Dijkstra step reads one row (1 KiB at C = 256), and
//     a matrix's rows are re-read ~10 times on cosine costs, so keeping the
//     matrix L1-resident matters (the launch sizes the L1/shared carve-out
//     for the number of matrices resident per SM).
//   * the argmin is three 32-bit warp min-reductions (redux.sync on sm_80+)
//     over the key (hi word of d, lo word of d, assigned<<31 | j), where d is
//     mapped to an order-preserving unsigned integer: deterministic, no
//     atomics, exact ties resolved as the design's key says. Across warps the
//     per-warp winners go through shared memory (one __syncthreads a step).
//   * the warm start is parallel too: column minima per thread; the
//     sequential rule "for j in increasing order assign r_j if row r_j is
//     free" is applied by one warp over chunks of 32 columns, the lowest lane
//     of each __match_any_sync group (same r_j) claiming the row.
//   * N > M, half/bfloat16, maximize and non-unit column strides go through
//     one coalesced (tiled, transposing when needed) copy into a contiguous
//     float/double work buffer first; a contiguous float/double minimisation
//     problem is read in place.
// Bad input only sets the status (no device-side assert); outputs are -1
// where the status is not 0.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAMacros.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <limits>
#include <mutex>
#include <tuple>
#include <type_traits>

namespace vicl_fast {
namespace lsa_cuda {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kStatusOk = 0;
constexpr int kStatusInvalid = 1;
constexpr int kStatusInfeasible = 2;
constexpr unsigned kAssignedBit = 0x80000000u;

// ----------------------------------------------------------------------------
// Argmin keys.

// Order-preserving map double -> uint64 (for non-NaN values). -0.0 is first
// turned into +0.0 (x + 0.0), so equal doubles give equal keys, as the CPU's
// `<` comparisons see them.
__device__ __forceinline__ unsigned long long order_key(double x) {
  const unsigned long long bits = static_cast<unsigned long long>(__double_as_longlong(x + 0.0));
  return (bits & 0x8000000000000000ull) ? ~bits : (bits | 0x8000000000000000ull);
}

__device__ __forceinline__ double key_value(unsigned long long key) {
  const unsigned long long bits = (key & 0x8000000000000000ull) ? (key & 0x7fffffffffffffffull) : ~key;
  return __longlong_as_double(static_cast<long long>(bits));
}

struct Key {
  unsigned long long d;  // order_key(distance)
  unsigned tail;         // (assigned << 31) | column
};

__device__ __forceinline__ Key sentinel_key() { return Key{~0ull, ~0u}; }

__device__ __forceinline__ bool key_less(const Key& a, const Key& b) {
  return a.d < b.d || (a.d == b.d && a.tail < b.tail);
}

__device__ __forceinline__ unsigned warp_min_u32(unsigned x) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  return __reduce_min_sync(kFull, x);
#else
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = min(x, __shfl_xor_sync(kFull, x, o));
  return x;
#endif
}

// Lexicographic warp minimum of (d, tail): three 32-bit reductions. The
// sentinel 0xffffffff of the later rounds only ever ties a real value that is
// itself the minimum, so it never changes the result.
__device__ __forceinline__ Key warp_argmin(const Key& k) {
  const unsigned hi = static_cast<unsigned>(k.d >> 32);
  const unsigned lo = static_cast<unsigned>(k.d);
  const unsigned mhi = warp_min_u32(hi);
  const unsigned mlo = warp_min_u32(hi == mhi ? lo : kFull);
  const unsigned mt = warp_min_u32((hi == mhi && lo == mlo) ? k.tail : kFull);
  return Key{(static_cast<unsigned long long>(mhi) << 32) | mlo, mt};
}

template <int W>
__device__ __forceinline__ void block_sync() {
  if constexpr (W == 1) {
    __syncwarp();
  } else {
    __syncthreads();
  }
}

template <int W>
__device__ __forceinline__ bool block_any(bool p) {
  if constexpr (W == 1) {
    __syncwarp();  // memory ordering (vote functions alone do not order memory)
    return __any_sync(kFull, p) != 0;
  } else {
    return __syncthreads_or(p) != 0;
  }
}

// Block-wide argmin. `red` holds 2*W keys: double buffered by `parity`, so a
// single __syncthreads per call is enough (a slot is rewritten two calls
// later, after every thread has passed the barrier of the call in between).
template <int W>
__device__ __forceinline__ Key block_argmin(Key k, Key* red, int parity) {
  k = warp_argmin(k);
  if constexpr (W == 1) {
    return k;
  } else {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) red[parity * W + warp] = k;
    __syncthreads();
    const Key m = lane < W ? red[parity * W + lane] : sentinel_key();
    return warp_argmin(m);
  }
}

// ----------------------------------------------------------------------------
// Per-thread column state: registers (K > 0, compile-time) or global memory.

template <int K>
struct RegCols {
  double d_[K];
  double v_[K];
  unsigned scanned_ = 0, assigned_ = 0;  // bit k
  __device__ __forceinline__ RegCols(double*, double*, unsigned char*, int) {}
  __device__ __forceinline__ int count() const { return K; }
  __device__ __forceinline__ double& d(int k, int) { return d_[k]; }
  __device__ __forceinline__ double& v(int k, int) { return v_[k]; }
  __device__ __forceinline__ bool scanned(int k, int) const { return (scanned_ >> k) & 1u; }
  __device__ __forceinline__ bool assigned(int k, int) const { return (assigned_ >> k) & 1u; }
  __device__ __forceinline__ void set_scanned(int k, int) { scanned_ |= 1u << k; }
  __device__ __forceinline__ void set_assigned(int k, int) { assigned_ |= 1u << k; }
  __device__ __forceinline__ void clear_scanned(int, int) { scanned_ = 0; }
};

// Global-memory column state, indexed by column (each column has one owner
// thread, so no synchronisation is needed on it).
struct MemCols {
  double* dp;
  double* vp;
  unsigned char* fp;  // bit 0 scanned, bit 1 assigned
  int k_count;
  __device__ __forceinline__ MemCols(double* d, double* v, unsigned char* f, int kc)
      : dp(d), vp(v), fp(f), k_count(kc) {}
  __device__ __forceinline__ int count() const { return k_count; }
  __device__ __forceinline__ double& d(int, int j) { return dp[j]; }
  __device__ __forceinline__ double& v(int, int j) { return vp[j]; }
  __device__ __forceinline__ bool scanned(int, int j) const { return fp[j] & 1u; }
  __device__ __forceinline__ bool assigned(int, int j) const { return (fp[j] >> 1) & 1u; }
  __device__ __forceinline__ void set_scanned(int, int j) { fp[j] |= 1u; }
  __device__ __forceinline__ void set_assigned(int, int j) { fp[j] |= 2u; }
  __device__ __forceinline__ void clear_scanned(int, int j) { fp[j] &= static_cast<unsigned char>(~1u); }
};

// Byte layout of one matrix's state (shared memory for K > 0, global scratch
// for K == 0): [d C doubles, v C doubles]  (K == 0 only), u R doubles,
// col4row R ints, row4col C ints, path C ints, [flags C bytes] (K == 0 only).
struct Layout {
  int64_t d, v, u, col4row, row4col, path, flags, total;
  __host__ __device__ Layout(int R, int C, bool mem_cols) {
    int64_t o = 0;
    d = o; if (mem_cols) o += int64_t(C) * 8;
    v = o; if (mem_cols) o += int64_t(C) * 8;
    u = o; o += int64_t(R) * 8;
    col4row = o; o += int64_t(R) * 4;
    row4col = o; o += int64_t(C) * 4;
    path = o; o += int64_t(C) * 4;
    flags = o; if (mem_cols) o += C;
    total = (o + 15) / 16 * 16;
  }
};

template <typename T>
__device__ __forceinline__ bool invalid_cost(T x) {
  // NaN, or -inf (+inf is a forbidden pair).
  return x != x || x == -std::numeric_limits<T>::infinity();
}

// ----------------------------------------------------------------------------
// The solver: one block of 32*W threads per matrix.
//   cost: work matrix b at cost + b*sb, row i at + i*sr, unit column stride.
template <typename T, int W, int K>
__global__ void __launch_bounds__(32 * W)
lsa_kernel(const T* __restrict__ cost, int64_t sb, int64_t sr, int R, int C, bool transposed,
           int64_t* __restrict__ row_out, int64_t* __restrict__ col_out, int* __restrict__ status_out,
           unsigned char* __restrict__ scratch, int64_t scratch_stride, int k_count) {
  constexpr int NT = 32 * W;
  constexpr bool kRegs = K > 0;
  using Cols = std::conditional_t<kRegs, RegCols<(K > 0 ? K : 1)>, MemCols>;
  constexpr double kInf = std::numeric_limits<double>::infinity();

  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ Key red[2 * W];

  const int b = blockIdx.x;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const T* __restrict__ mat = cost + int64_t(b) * sb;

  const Layout L(R, C, !kRegs);
  unsigned char* base = kRegs ? smem_raw : scratch + int64_t(b) * scratch_stride;
  double* u = reinterpret_cast<double*>(base + L.u);
  int* col4row = reinterpret_cast<int*>(base + L.col4row);
  int* row4col = reinterpret_cast<int*>(base + L.row4col);
  int* path = reinterpret_cast<int*>(base + L.path);
  Cols cols(reinterpret_cast<double*>(base + L.d), reinterpret_cast<double*>(base + L.v), base + L.flags,
            kRegs ? K : k_count);

  for (int i = tid; i < R; i += NT) {
    u[i] = 0.0;
    col4row[i] = -1;
  }
  for (int j = tid; j < C; j += NT) row4col[j] = -1;
#pragma unroll
  for (int k = 0; k < cols.count(); ++k) {
    const int j = tid + NT * k;
    if (!kRegs && j >= C) break;
    cols.v(k, j) = 0.0;
    if constexpr (!kRegs) cols.fp[j] = 0;
  }
  block_sync<W>();

  // ---- validation + warm start ------------------------------------------
  int parity = 0;  // slot of the double-buffered cross-warp argmin
  bool bad = false, inf_line = false;
  if (R == C) {
    // Column reduction: v[j] = min_i c[i][j], r_j = lowest i attaining it
    // (kept in path[j] until the assignment pass).
#pragma unroll
    for (int k = 0; k < cols.count(); ++k) {
      const int j = tid + NT * k;
      if (j < C) {
        T best = __ldg(mat + j);
        int arg = 0;
        bad |= invalid_cost(best);
#pragma unroll 8
        for (int i = 1; i < R; ++i) {
          const T x = __ldg(mat + int64_t(i) * sr + j);
          bad |= invalid_cost(x);
          if (x < best) {
            best = x;
            arg = i;
          }
        }
        cols.v(k, j) = static_cast<double>(best);
        path[j] = arg;
        inf_line |= static_cast<double>(best) == kInf;
      }
    }
  } else {
    // Row reduction: u[i] = min_j c[i][j], c_i = lowest j attaining it (kept
    // in path[i]); v stays 0.
    for (int i = 0; i < R; ++i) {
      const T* row = mat + int64_t(i) * sr;
      Key best = sentinel_key();
#pragma unroll
      for (int k = 0; k < cols.count(); ++k) {
        const int j = tid + NT * k;
        if (j < C) {
          const T x = __ldg(row + j);
          bad |= invalid_cost(x);
          const Key key{order_key(static_cast<double>(x)), static_cast<unsigned>(j)};
          if (key_less(key, best)) best = key;
        } else if (!kRegs) {
          break;
        }
      }
      best = block_argmin<W>(best, red, parity);
      parity ^= 1;
      if (tid == 0) {
        const double m = key_value(best.d);
        u[i] = m;
        path[i] = static_cast<int>(best.tail);
        inf_line |= m == kInf;
      }
    }
  }
  int status = kStatusOk;
  if (block_any<W>(bad)) {
    status = kStatusInvalid;
  } else if (block_any<W>(inf_line)) {
    status = kStatusInfeasible;
  }

  if (status == kStatusOk) {
    // Sequential claim rule, 32 candidates at a time in increasing order:
    // square: column j claims row r_j if free; rectangular: row i claims
    // column c_i if free. Within a chunk the lowest lane of a group with the
    // same target wins, exactly as the sequential loop would decide.
    if (warp == 0) {
      const int n = (R == C) ? C : R;
      for (int x0 = 0; x0 < n; x0 += 32) {
        const int x = x0 + lane;
        const int target = x < n ? path[x] : -1;
        const unsigned peers = __match_any_sync(kFull, target);
        if (x < n && (__ffs(peers) - 1) == lane) {
          if (R == C) {
            if (col4row[target] == -1) {
              col4row[target] = x;
              row4col[x] = target;
            }
          } else {
            if (row4col[target] == -1) {
              row4col[target] = x;
              col4row[x] = target;
            }
          }
        }
        __syncwarp();
      }
    }
    block_sync<W>();
#pragma unroll
    for (int k = 0; k < cols.count(); ++k) {
      const int j = tid + NT * k;
      if (j < C && row4col[j] != -1) cols.set_assigned(k, j);
    }

    // ---- shortest augmenting paths, free rows in increasing order --------
    for (int cur = 0; cur < R && status == kStatusOk; ++cur) {
      if (col4row[cur] != -1) continue;  // uniform: shared memory after a barrier
#pragma unroll
      for (int k = 0; k < cols.count(); ++k) {
        const int j = tid + NT * k;
        if (j < C) {
          cols.d(k, j) = kInf;
          cols.clear_scanned(k, j);
        } else if (!kRegs) {
          break;
        }
      }
      double min_val = 0.0;
      int i = cur;
      int sink = -1;
      while (true) {
        const double ui = u[i];
        const T* row = mat + int64_t(i) * sr;
        Key best = sentinel_key();
        if constexpr (kRegs) {
          // All loads of the row first (independent, in flight together).
          T c[kRegs ? K : 1];
#pragma unroll
          for (int k = 0; k < K; ++k) {
            const int j = tid + NT * k;
            c[k] = (j < C) ? __ldg(row + j) : T(0);
          }
#pragma unroll
          for (int k = 0; k < K; ++k) {
            const int j = tid + NT * k;
            if (j < C && !cols.scanned(k, j)) {
              const double r = ((min_val + static_cast<double>(c[k])) - ui) - cols.v(k, j);
              if (r < cols.d(k, j)) {
                cols.d(k, j) = r;
                path[j] = i;
              }
              const Key key{order_key(cols.d(k, j)), (cols.assigned(k, j) ? kAssignedBit : 0u) | unsigned(j)};
              if (key_less(key, best)) best = key;
            }
          }
        } else {
          for (int k = 0; k < cols.count(); ++k) {
            const int j = tid + NT * k;
            if (j >= C) break;
            if (!cols.scanned(k, j)) {
              const double r = ((min_val + static_cast<double>(__ldg(row + j))) - ui) - cols.v(k, j);
              if (r < cols.d(k, j)) {
                cols.d(k, j) = r;
                path[j] = i;
              }
              const Key key{order_key(cols.d(k, j)), (cols.assigned(k, j) ? kAssignedBit : 0u) | unsigned(j)};
              if (key_less(key, best)) best = key;
            }
          }
        }
        best = block_argmin<W>(best, red, parity);
        parity ^= 1;
        if (best.d >= order_key(kInf)) {  // no finite path to a free column
          status = kStatusInfeasible;
          break;
        }
        min_val = key_value(best.d);
        const int jstar = static_cast<int>(best.tail & ~kAssignedBit);
        if (jstar % NT == tid) cols.set_scanned(jstar / NT, jstar);
        if (!(best.tail & kAssignedBit)) {
          sink = jstar;
          break;
        }
        i = row4col[jstar];
      }
      if (status != kStatusOk) break;

      // Dual update (SciPy's order). The scanned rows other than cur are
      // exactly row4col[j] of the scanned columns j != sink, and
      // col4row[row4col[j]] == j, so the owner of j updates that row.
      if (tid == 0) u[cur] += min_val;
#pragma unroll
      for (int k = 0; k < cols.count(); ++k) {
        const int j = tid + NT * k;
        if (j < C) {
          if (cols.scanned(k, j)) {
            const double dk = cols.d(k, j);
            if (j != sink) u[row4col[j]] += min_val - dk;
            cols.v(k, j) -= min_val - dk;
          }
        } else if (!kRegs) {
          break;
        }
      }
      block_sync<W>();
      if (tid == 0) {  // augment along the path (short: a few steps)
        int j = sink;
        while (true) {
          const int pi = path[j];
          row4col[j] = pi;
          const int t = col4row[pi];
          col4row[pi] = j;
          j = t;
          if (pi == cur) break;
        }
      }
      if (sink % NT == tid) cols.set_assigned(sink / NT, sink);
      block_sync<W>();
    }
  }

  // ---- output in SciPy's form ---------------------------------------------
  int64_t* rows = row_out + int64_t(b) * R;
  int64_t* colsout = col_out + int64_t(b) * R;
  if (status != kStatusOk) {
    for (int i = tid; i < R; i += NT) {
      rows[i] = -1;
      colsout[i] = -1;
    }
  } else if (!transposed) {
    for (int i = tid; i < R; i += NT) {
      rows[i] = i;
      colsout[i] = col4row[i];
    }
  } else if (warp == 0) {
    // Original row = work column j, original column = row4col[j]; pairs in
    // increasing j are SciPy's order (row_ind ascending). Compaction by ballot.
    int pos = 0;
    for (int j0 = 0; j0 < C; j0 += 32) {
      const int j = j0 + lane;
      const int r = j < C ? row4col[j] : -1;
      const unsigned m = __ballot_sync(kFull, r != -1);
      if (r != -1) {
        const int p = pos + __popc(m & ((1u << lane) - 1u));
        rows[p] = j;
        colsout[p] = r;
      }
      pos += __popc(m);
    }
  }
  if (tid == 0) status_out[b] = status;
}

// ----------------------------------------------------------------------------
// Work-matrix preparation: work[b][i][j] = sign * (T) cost[b, i, j] (or
// cost[b, j, i] when transposed), 32x32 tiles through shared memory so both
// the read and the write are coalesced.
template <typename In, typename T>
__global__ void __launch_bounds__(256)
prepare_kernel(const In* __restrict__ cost, int64_t sb, int64_t sn, int64_t sm, int64_t B, int R, int C,
               bool transposed, bool negate, T* __restrict__ work) {
  __shared__ T tile[32][33];
  const int tx = threadIdx.x, ty = threadIdx.y;  // 32 x 8
  const int j0 = blockIdx.x * 32, i0 = blockIdx.y * 32;
  for (int64_t b = blockIdx.z; b < B; b += gridDim.z) {
    const In* src = cost + b * sb;
    T* dst = work + b * int64_t(R) * C;
    if (!transposed) {
      for (int y = ty; y < 32; y += 8) {
        const int i = i0 + y, j = j0 + tx;
        if (i < R && j < C) {
          T x = static_cast<T>(static_cast<std::conditional_t<std::is_same_v<T, double>, double, float>>(
              src[int64_t(i) * sn + int64_t(j) * sm]));
          dst[int64_t(i) * C + j] = negate ? -x : x;
        }
      }
    } else {
      // work row i = original column, work column j = original row.
      for (int y = ty; y < 32; y += 8) {
        const int j = j0 + y, i = i0 + tx;  // read original (row j, column i): coalesced in i
        if (i < R && j < C) {
          T x = static_cast<T>(static_cast<std::conditional_t<std::is_same_v<T, double>, double, float>>(
              src[int64_t(j) * sn + int64_t(i) * sm]));
          tile[y][tx] = negate ? -x : x;
        }
      }
      __syncthreads();
      for (int y = ty; y < 32; y += 8) {
        const int i = i0 + y, j = j0 + tx;
        if (i < R && j < C) dst[int64_t(i) * C + j] = tile[tx][y];
      }
      __syncthreads();
    }
  }
}

// ----------------------------------------------------------------------------
// Host side.

// The device limits a launch needs. Read once per device: the solver runs at
// every training step and these never change while the process lives.
struct DeviceLimits {
  int sm_count = 1, smem_optin = 48 * 1024, smem_per_sm = 48 * 1024, smem_reserved = 0;
};

inline const DeviceLimits& device_limits(int device) {
  static std::once_flag once[C10_COMPILE_TIME_MAX_GPUS];
  static DeviceLimits limits[C10_COMPILE_TIME_MAX_GPUS];
  TORCH_CHECK(device >= 0 && device < C10_COMPILE_TIME_MAX_GPUS, "linear_sum_assignment: bad CUDA device ", device);
  // A failed query throws out of call_once, which leaves the flag unset (retried next call).
  std::call_once(once[device], [device] {
    DeviceLimits l;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&l.sm_count, cudaDevAttrMultiProcessorCount, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&l.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&l.smem_per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&l.smem_reserved, cudaDevAttrReservedSharedMemoryPerBlock, device));
    limits[device] = l;
  });
  return limits[device];
}

template <typename T, int W, int K>
bool launch_solver(const T* cost, int64_t sb, int64_t sr, int64_t B, int R, int C, bool transposed,
                   int64_t* row_out, int64_t* col_out, int* status_out, const at::Tensor& like,
                   cudaStream_t stream) {
  auto kernel = lsa_kernel<T, W, K>;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const DeviceLimits& lim = device_limits(device);
  const Layout L(R, C, K == 0);
  at::Tensor scratch;
  unsigned char* scratch_ptr = nullptr;
  int64_t smem = 0;
  if (K > 0) {
    smem = L.total;
    if (smem > lim.smem_optin) return false;  // caller falls back
    if (smem > 48 * 1024) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(smem)));
    }
    // Leave the rest of the SM's unified L1/shared memory to L1, which then
    // caches the cost rows the matrices resident on the SM re-read at every
    // Dijkstra step. Enough shared memory is kept for every matrix of the
    // batch to be resident at once, but never for more blocks than can really
    // be resident (registers, threads, blocks per SM and shared memory cap
    // that count well below B / sm_count for large batches): shared memory
    // reserved beyond that is L1 lost for nothing.
    // The carveout is a per-kernel attribute that persists across calls and
    // the occupancy query may count blocks against it, so the previous call's
    // (possibly small) carveout is lifted first: the query then sees what the
    // hardware allows, not what an earlier, smaller batch asked for.
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                        static_cast<int>(cudaSharedmemCarveoutMaxShared)));
    int resident = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, kernel, 32 * W,
                                                                 static_cast<size_t>(smem)));
    // 0: dynamic + static + reserved shared memory exceed what an SM has even
    // though the dynamic part alone fits the opt-in limit; the launch would fail.
    if (resident < 1) return false;  // caller falls back
    int64_t per_sm = (B + lim.sm_count - 1) / lim.sm_count;
    if (per_sm > resident) per_sm = resident;
    const int64_t want = per_sm * (smem + lim.smem_reserved + int64_t(sizeof(Key)) * 2 * W);
    const int64_t smem_per_sm = lim.smem_per_sm;
    int carveout = static_cast<int>((want * 100 + smem_per_sm - 1) / smem_per_sm);
    carveout = carveout < 1 ? 1 : (carveout > 100 ? 100 : carveout);
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, carveout));
  } else {
    scratch = at::empty({B * L.total}, like.options().dtype(at::kByte));
    scratch_ptr = scratch.data_ptr<uint8_t>();
  }
  const int k_count = (C + 32 * W - 1) / (32 * W);
  kernel<<<static_cast<unsigned>(B), 32 * W, static_cast<size_t>(smem), stream>>>(
      cost, sb, sr, R, C, transposed, row_out, col_out, status_out, scratch_ptr, L.total, k_count);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

template <typename T>
void solve(const T* cost, int64_t sb, int64_t sr, int64_t B, int R, int C, bool transposed,
           int64_t* row_out, int64_t* col_out, int* status_out, const at::Tensor& like, cudaStream_t stream) {
  auto go = [&](auto w, auto k) {
    return launch_solver<T, decltype(w)::value, decltype(k)::value>(cost, sb, sr, B, R, C, transposed, row_out,
                                                                   col_out, status_out, like, stream);
  };
  using std::integral_constant;
  bool ok = false;
  if (C <= 32) ok = go(integral_constant<int, 1>{}, integral_constant<int, 1>{});
  else if (C <= 64) ok = go(integral_constant<int, 1>{}, integral_constant<int, 2>{});
  else if (C <= 128) ok = go(integral_constant<int, 1>{}, integral_constant<int, 4>{});
  else if (C <= 256) ok = go(integral_constant<int, 1>{}, integral_constant<int, 8>{});
  else if (C <= 512) ok = go(integral_constant<int, 1>{}, integral_constant<int, 16>{});
  else if (C <= 1024) ok = go(integral_constant<int, 4>{}, integral_constant<int, 8>{});
  else if (C <= 2048) ok = go(integral_constant<int, 8>{}, integral_constant<int, 8>{});
  else if (C <= 4096) ok = go(integral_constant<int, 16>{}, integral_constant<int, 8>{});
  if (!ok) go(integral_constant<int, 16>{}, integral_constant<int, 0>{});  // state in global memory
}

template <typename In, typename T>
void prepare(const at::Tensor& cost, int64_t B, int R, int C, bool transposed, bool negate, at::Tensor& work,
             cudaStream_t stream) {
  TORCH_CHECK_VALUE((R + 31) / 32 <= 65535, "linear_sum_assignment: min(N, M) too large (> 2^21)");
  const dim3 block(32, 8);
  const dim3 grid(static_cast<unsigned>((C + 31) / 32), static_cast<unsigned>((R + 31) / 32),
                  static_cast<unsigned>(B < 65535 ? B : 65535));
  prepare_kernel<In, T><<<grid, block, 0, stream>>>(
      reinterpret_cast<const In*>(cost.const_data_ptr()), cost.stride(0), cost.stride(1), cost.stride(2), B, R, C,
      transposed, negate, work.mutable_data_ptr<T>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_sum_assignment_cuda(const at::Tensor& cost, bool maximize) {
  TORCH_CHECK_VALUE(cost.dim() == 3, "linear_sum_assignment: cost must be (B, N, M), got ", cost.dim(), " dims");
  const auto st = cost.scalar_type();
  TORCH_CHECK_TYPE(st == at::kHalf || st == at::kBFloat16 || st == at::kFloat || st == at::kDouble,
                   "linear_sum_assignment: cost must be float16/bfloat16/float32/float64, got ", st);
  TORCH_CHECK_VALUE(cost.is_cuda(), "linear_sum_assignment (CUDA kernel): cost must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(cost.device());
  const int64_t B = cost.size(0), N = cost.size(1), M = cost.size(2);
  const int64_t K = N < M ? N : M;
  const bool transposed = N > M;
  TORCH_CHECK_VALUE(N <= std::numeric_limits<int>::max() / 2 && M <= std::numeric_limits<int>::max() / 2,
                    "linear_sum_assignment: N and M must be below 2^30");
  const auto long_opts = cost.options().dtype(at::kLong);
  at::Tensor row_ind = at::empty({B, K}, long_opts);
  at::Tensor col_ind = at::empty({B, K}, long_opts);
  at::Tensor status = at::empty({B}, cost.options().dtype(at::kInt));
  if (B == 0) return {row_ind, col_ind, status};
  if (K == 0) {
    status.zero_();
    return {row_ind, col_ind, status};
  }
  TORCH_CHECK_VALUE(B <= std::numeric_limits<int>::max(), "linear_sum_assignment: batch too large for one launch");
  const int R = static_cast<int>(K), C = static_cast<int>(transposed ? N : M);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  int64_t* rp = row_ind.mutable_data_ptr<int64_t>();
  int64_t* cp = col_ind.mutable_data_ptr<int64_t>();
  int* sp = status.mutable_data_ptr<int>();

  const bool wide = st == at::kDouble;
  const bool direct = (st == at::kFloat || st == at::kDouble) && !maximize && !transposed &&
                      (cost.stride(2) == 1 || M == 1);
  if (direct) {
    if (wide) {
      solve<double>(cost.const_data_ptr<double>(), cost.stride(0), cost.stride(1), B, R, C, false, rp, cp, sp, cost,
                    stream);
    } else {
      solve<float>(cost.const_data_ptr<float>(), cost.stride(0), cost.stride(1), B, R, C, false, rp, cp, sp, cost,
                   stream);
    }
    return {row_ind, col_ind, status};
  }
  at::Tensor work = at::empty({B, R, C}, cost.options().dtype(wide ? at::kDouble : at::kFloat));
  switch (st) {
    case at::kHalf: prepare<at::Half, float>(cost, B, R, C, transposed, maximize, work, stream); break;
    case at::kBFloat16: prepare<at::BFloat16, float>(cost, B, R, C, transposed, maximize, work, stream); break;
    case at::kFloat: prepare<float, float>(cost, B, R, C, transposed, maximize, work, stream); break;
    default: prepare<double, double>(cost, B, R, C, transposed, maximize, work, stream); break;
  }
  if (wide) {
    solve<double>(work.const_data_ptr<double>(), int64_t(R) * C, C, B, R, C, transposed, rp, cp, sp, work, stream);
  } else {
    solve<float>(work.const_data_ptr<float>(), int64_t(R) * C, C, B, R, C, transposed, rp, cp, sp, work, stream);
  }
  return {row_ind, col_ind, status};
}

}  // namespace lsa_cuda
}  // namespace vicl_fast

TORCH_LIBRARY_IMPL(vicl_fast, CUDA, m) {
  m.impl("linear_sum_assignment", &vicl_fast::lsa_cuda::linear_sum_assignment_cuda);
}
