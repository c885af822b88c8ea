// An in-place grouped matmul for the MoE's routed experts on the CPU, as an XLA FFI custom call.
//
// out[r] = x[r] @ w[expert(r)] for rows x [R, K] sorted by expert (group_sizes [E]: the first group_sizes[0] rows
// are expert 0's, and so on; rows past the groups get zeros), weights w [E, K, N], x and w each fp32 or bf16, out
// fp32. The weights are read where they lie: XLA:CPU copies an expert's weights out of the stacked tensor before
// a dot can read them (a dynamic slice or a gather), which costs more than the matmul in a decode step.
//
// Every output element is one chain of fused multiply-adds over k = 0, 1, ..., K-1 starting from zero, whatever
// the number of rows, their grouping, the tile a row falls in, or the vector width: a row's output depends on its
// own x row and its expert's weights only (batch-invariant by construction), and is the same on any x86 ISA
// (AVX-512, AVX2 + FMA, or scalar fmaf: a fused multiply-add is exactly rounded). Build without -ffast-math.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "pool.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// Inside the namespace of simd.h and pool.h: their names (fma, load, Pool, ...) come before the C library's.
namespace qwen_kernels {
namespace {

// Tiling (none of it changes a sum's order). Measured on a 2-core AVX-512 Xeon: the bench config at 4 and 64 rows,
// and a real-width prefill's experts (4096 rows over 256 experts, K x N = 2048 x 1024 in fp32, one thread, under
// load): 4 rows x 4 vectors with 64-feature blocks 36-50 GFLOP/s, 6 x 4 55-61, 8 x 3 with 32-feature blocks 66-68.
constexpr int kRowTile = 8;     // rows sharing each load of weights
constexpr int kPrefetch = 16;   // weight rows prefetched ahead (0, 8, 16, 32 tried: 16 best)
constexpr int64_t kBlock = 32;  // input features per pass over a row tile's columns (16, 32, 64, 128, 256 tried)
// Vectors of columns per tile: enough independent accumulators to hide the FMA latency, few enough to stay in
// registers (rows * vectors accumulators plus the vectors of weights: at most 27 of AVX-512's 32).
template <int ROWS>
constexpr int vec_tile() { return ROWS <= 2 ? 8 : ROWS <= 6 ? 4 : 3; }

// Rows x [ROWS, K] (row stride K) times w [K, N] (row stride N) at columns [0, VECS * kWidth): out (row stride N).
template <int ROWS, int VECS, typename XT, typename WT>
void tile(const XT* x, const WT* w, float* out, int64_t K, int64_t N, int64_t k0, int64_t k1) {
  Vec acc[ROWS][VECS];
  for (int r = 0; r < ROWS; ++r)
    for (int v = 0; v < VECS; ++v) acc[r][v] = k0 == 0 ? zero() : load(out + r * N + v * kWidth);
  for (int64_t k = k0; k < k1; ++k) {
    const WT* wk = w + k * N;
    for (int byte = 0; byte < VECS * kWidth * int(sizeof(WT)); byte += 64)
      __builtin_prefetch(reinterpret_cast<const char*>(wk + kPrefetch * N) + byte);
    Vec wv[VECS];
    for (int v = 0; v < VECS; ++v) wv[v] = load(wk + v * kWidth);
    for (int r = 0; r < ROWS; ++r) {
      Vec xr = broadcast(to_f32(x[r * K + k]));
      for (int v = 0; v < VECS; ++v) acc[r][v] = fma(xr, wv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int v = 0; v < VECS; ++v) store(out + r * N + v * kWidth, acc[r][v]);
}

// The same chain per element, one column at a time (the columns past the last whole vector).
template <typename XT, typename WT>
void column(const XT* x, const WT* w, float* out, int rows, int64_t K, int64_t N, int64_t k0, int64_t k1) {
  for (int r = 0; r < rows; ++r) {
    float acc = k0 == 0 ? 0.0f : out[r * N];
    for (int64_t k = k0; k < k1; ++k) acc = std::fmaf(to_f32(x[r * K + k]), to_f32(w[k * N]), acc);
    out[r * N] = acc;
  }
}

// Columns [n0, n1) of a row tile, input features [k0, k1): each element's chain goes on where the previous block
// of features left it.
template <int ROWS, typename XT, typename WT>
void row_tile(const XT* x, const WT* w, float* out, int64_t K, int64_t N, int64_t n0, int64_t n1, int64_t k0,
              int64_t k1) {
  constexpr int kVecs = vec_tile<ROWS>();
  int64_t n = n0;
  for (; n + kVecs * kWidth <= n1; n += kVecs * kWidth) tile<ROWS, kVecs>(x, w + n, out + n, K, N, k0, k1);
  for (; n + kWidth <= n1; n += kWidth) tile<ROWS, 1>(x, w + n, out + n, K, N, k0, k1);
  for (; n < n1; ++n) column(x, w + n, out + n, ROWS, K, N, k0, k1);
}

// row_tile<rows> for 1 <= rows <= ROWS (the last tile of an expert's rows may be short).
template <int ROWS, typename XT, typename WT>
void some_rows(int rows, const XT* x, const WT* w, float* out, int64_t K, int64_t N, int64_t n0, int64_t n1,
               int64_t k0, int64_t k1) {
  if constexpr (ROWS > 1)
    if (rows < ROWS) return some_rows<ROWS - 1>(rows, x, w, out, K, N, n0, n1, k0, k1);
  row_tile<ROWS>(x, w, out, K, N, n0, n1, k0, k1);
}

// Columns [n0, n1) of one expert's rows (``rows`` rows of x and out, from the expert's first). A block of the
// expert's weights (kBlock input features) is read from memory once, then from the cache by each of the expert's
// row tiles (a prefill has tens of rows per expert).
template <typename XT, typename WT>
void expert_columns(const XT* x, const WT* w, float* out, int64_t rows, int64_t K, int64_t N, int64_t n0,
                    int64_t n1) {
  for (int64_t k0 = 0; k0 < K; k0 += kBlock) {
    const int64_t k1 = std::min(K, k0 + kBlock);
    for (int64_t row = 0; row < rows; row += kRowTile) {
      const int tile_rows = int(std::min<int64_t>(kRowTile, rows - row));
      some_rows<kRowTile>(tile_rows, x + row * K, w, out + row * N, K, N, n0, n1, k0, k1);
    }
  }
}

// The work of a call is cut into items, one expert's rows at one chunk of columns, in the order the weights lie
// (expert by expert, chunk by chunk): an item reads about kItemWeights weight elements (1 MiB in fp32), which
// stay in the core's L2 cache while the item's row tiles go over them, and the items are shared out among the
// calling thread and a pool's workers as each asks for the next. Every output element is still computed whole by
// one thread, with the same chain: how the items fall changes no bit.
constexpr int64_t kItemWeights = int64_t(1) << 18;

struct Item {
  int64_t row, rows, expert, n0, n1;
};

// Column chunk width: a multiple of the widest tile, about kItemWeights weights, within the kMaxItems limit.
inline int64_t chunk_columns(int64_t K, int64_t N, int64_t used) {
  const int64_t step = 8 * kWidth;
  int64_t chunk = std::max<int64_t>(step, kItemWeights / std::max<int64_t>(K, 1) / step * step);
  const int64_t per_expert = kMaxItems / std::max<int64_t>(used, 1);
  if ((N + chunk - 1) / chunk > per_expert) chunk = (N + per_expert - 1) / per_expert;
  return std::min(N, chunk);
}

std::vector<Item> items_of(const int32_t* group_sizes, int64_t R, int64_t K, int64_t N, int64_t E) {
  int64_t used = 0;
  for (int64_t e = 0; e < E; ++e) used += group_sizes[e] > 0;
  const int64_t chunk = chunk_columns(K, N, used);
  std::vector<Item> items;
  int64_t row = 0;
  for (int64_t e = 0; e < E && row < R; ++e) {
    const int64_t rows = std::min<int64_t>(R - row, std::max<int32_t>(group_sizes[e], 0));
    for (int64_t n0 = 0; rows > 0 && n0 < N; n0 += chunk) items.push_back({row, rows, e, n0, std::min(N, n0 + chunk)});
    row += rows;
  }
  return items;
}

template <typename XT, typename WT>
struct Job {
  const XT* x;
  const WT* w;
  float* out;
  int64_t K, N;
  const Item* items;

  static void run(const void* self, int64_t i) {
    const Job& job = *static_cast<const Job*>(self);
    const Item& it = job.items[i];
    expert_columns(job.x + it.row * job.K, job.w + it.expert * job.K * job.N, job.out + it.row * job.N, it.rows,
                   job.K, job.N, it.n0, it.n1);
  }
};

template <typename XT, typename WT>
void grouped_matmul(const XT* x, const int32_t* group_sizes, const WT* w, float* out, int64_t R, int64_t K,
                    int64_t N, int64_t E) {
  const std::vector<Item> items = items_of(group_sizes, R, K, N, E);
  int64_t grouped = 0;
  for (const Item& it : items) grouped = std::max(grouped, it.row + it.rows);
  std::fill(out + grouped * N, out + R * N, 0.0f);  // rows in no group
  const Job<XT, WT> job{x, w, out, K, N, items.data()};
  const int64_t count = int64_t(items.size());
  int64_t weights = 0;  // read by the call: a small product stays on the calling thread (a wake costs microseconds)
  for (const Item& it : items) weights += K * (it.n1 - it.n0);
  const bool shared = count > 1 && count <= kMaxItems && weights >= kItemWeights && Pool::get()->workers() > 0;
  if (shared && Pool::get()->run(&Job<XT, WT>::run, &job, count)) return;
  for (int64_t i = 0; i < count; ++i) Job<XT, WT>::run(&job, i);
}

template <typename XT>
ffi::Error dispatch_weights(const XT* x, const int32_t* sizes, ffi::AnyBuffer w, float* out, int64_t R, int64_t K,
                            int64_t N, int64_t E) {
  switch (w.element_type()) {
    case ffi::DataType::F32:
      grouped_matmul(x, sizes, static_cast<const float*>(w.untyped_data()), out, R, K, N, E);
      return ffi::Error::Success();
    case ffi::DataType::BF16:
      grouped_matmul(x, sizes, static_cast<const bf16*>(w.untyped_data()), out, R, K, N, E);
      return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument("grouped_matmul: weights must be float32 or bfloat16");
  }
}

ffi::Error GroupedMatmulImpl(ffi::AnyBuffer x, ffi::Buffer<ffi::S32> group_sizes, ffi::AnyBuffer w,
                             ffi::ResultBuffer<ffi::F32> out) {
  auto xd = x.dimensions(), wd = w.dimensions(), od = out->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || od.size() != 2)
    return ffi::Error::InvalidArgument("grouped_matmul: expected x [R, K], w [E, K, N], out [R, N]");
  const int64_t R = xd[0], K = xd[1], E = wd[0], N = wd[2];
  if (wd[1] != K || od[0] != R || od[1] != N || group_sizes.element_count() != size_t(E))
    return ffi::Error::InvalidArgument("grouped_matmul: shapes of x, group_sizes, w and out do not agree");
  const int32_t* sizes = group_sizes.typed_data();
  float* o = out->typed_data();
  switch (x.element_type()) {
    case ffi::DataType::F32:
      return dispatch_weights(static_cast<const float*>(x.untyped_data()), sizes, w, o, R, K, N, E);
    case ffi::DataType::BF16:
      return dispatch_weights(static_cast<const bf16*>(x.untyped_data()), sizes, w, o, R, K, N, E);
    default:
      return ffi::Error::InvalidArgument("grouped_matmul: x must be float32 or bfloat16");
  }
}

}  // namespace
}  // namespace qwen_kernels

XLA_FFI_DEFINE_HANDLER_SYMBOL(QwenGroupedMatmul, qwen_kernels::GroupedMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
