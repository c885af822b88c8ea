// The gated delta rule's one-token decode step on the CPU, as an XLA FFI custom call, the state updated in place.
//
// Inputs (fp32): q, k [B, H, dk], v [B, H, dv], decay = exp(g) and beta [B, H], state [B, H, dk, dv]; outputs out
// [B, H, dv] and the new state (the state's buffer, aliased). Per (row b, head h), with S = state[b, h]:
//   S' = S * decay;  kv[j] = sum_i S'[i, j] k[i];  delta[j] = (v[j] - kv[j]) * beta;
//   S''[i, j] = S'[i, j] + k[i] delta[j];  out[j] = sum_i S''[i, j] q[i].
// Each sum is one chain of fused multiply-adds over i = 0, 1, ..., dk-1 in order from zero (kv: fma(S', k, acc);
// out: fma(S'', q, acc)); the update S'' = fma(k[i], delta[j], S') is fused too (one rounding); S * decay, v - kv
// and * beta are plain, each rounded once. The same operations on AVX-512, AVX2 + FMA and the scalar path (fmaf:
// a fused multiply-add is exactly rounded), vectorised across j only. A (row, head)'s results depend on its own
// operands only (batch-invariant by construction). Build without -ffast-math, with -ffp-contract=off.
//
// The passes go column block by column block (kv[j] and delta[j] need column j of S only): pass 1 reads the
// block's rows for kv, pass 2 reads them again (from the cache: a head's state is 16 KiB at dk = dv = 64, 64 KiB
// at 128), updates them, writes them once and accumulates out. XLA's form reads and writes the state three times.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "pool.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// Inside the namespace of simd.h and pool.h: their names (fma, load, Pool, ...) come before the C library's.
namespace qwen_kernels {
namespace {


// Vectors of columns per block: 64 columns with AVX-512 or AVX2, in registers (kv, delta and out accumulators).
constexpr int kVecs = 64 / kWidth < 1 ? 1 : 64 / kWidth;

struct Head {
  const float *q, *k, *v;
  float decay, beta;
  const float* s_in;  // [dk, dv], row stride dv
  float* s_out;       // the same buffer when XLA honours the alias
  float* out;         // [dv]
  int64_t dk, dv;
};

// Columns [j, j + VECS * kWidth) of one head: both passes.
template <int VECS>
void columns(const Head& h, int64_t j) {
  const Vec decay = broadcast(h.decay);
  Vec acc[VECS];
  for (int c = 0; c < VECS; ++c) acc[c] = zero();
  for (int64_t i = 0; i < h.dk; ++i) {
    const float* row = h.s_in + i * h.dv + j;
    const Vec ki = broadcast(h.k[i]);
    for (int c = 0; c < VECS; ++c) acc[c] = fma(mul(load(row + c * kWidth), decay), ki, acc[c]);
  }
  const Vec beta = broadcast(h.beta);
  Vec delta[VECS], out[VECS];
  for (int c = 0; c < VECS; ++c) {
    delta[c] = mul(sub(load(h.v + j + c * kWidth), acc[c]), beta);
    out[c] = zero();
  }
  for (int64_t i = 0; i < h.dk; ++i) {
    const float* row = h.s_in + i * h.dv + j;
    float* row_out = h.s_out + i * h.dv + j;
    const Vec ki = broadcast(h.k[i]), qi = broadcast(h.q[i]);
    for (int c = 0; c < VECS; ++c) {
      const Vec s = fma(ki, delta[c], mul(load(row + c * kWidth), decay));
      store(row_out + c * kWidth, s);
      out[c] = fma(s, qi, out[c]);
    }
  }
  for (int c = 0; c < VECS; ++c) store(h.out + j + c * kWidth, out[c]);
}

// Column j alone (the columns past the last whole vector): the same operations, scalar.
void column(const Head& h, int64_t j) {
  float acc = 0.0f;
  for (int64_t i = 0; i < h.dk; ++i) acc = std::fmaf(h.s_in[i * h.dv + j] * h.decay, h.k[i], acc);
  const float delta = (h.v[j] - acc) * h.beta;
  float out = 0.0f;
  for (int64_t i = 0; i < h.dk; ++i) {
    const float s = std::fmaf(h.k[i], delta, h.s_in[i * h.dv + j] * h.decay);
    h.s_out[i * h.dv + j] = s;
    out = std::fmaf(s, h.q[i], out);
  }
  h.out[j] = out;
}

void head(const Head& h) {
  int64_t j = 0;
  for (; j + kVecs * kWidth <= h.dv; j += kVecs * kWidth) columns<kVecs>(h, j);
  for (; j + kWidth <= h.dv; j += kWidth) columns<1>(h, j);
  for (; j < h.dv; ++j) column(h, j);
}

// A call's (row, head) pairs, in memory order, are cut into items of about kItemState state elements (128 KiB in
// fp32, whole heads), shared out among the calling thread and the pool's workers when the call's state reaches
// kSharedState (1 MiB: one layer at batch 16 and the bench's 8 x 64 x 64 heads, 2 MiB; at 32 x 128 x 128 heads,
// 32 MiB). Each head is computed whole by one thread, by the same loops: how the items fall changes no bit.
constexpr int64_t kItemState = int64_t(1) << 15;
constexpr int64_t kSharedState = int64_t(1) << 18;

struct Job {
  const float *q, *k, *v, *decay, *beta, *s_in;
  float *s_out, *out;
  int64_t pairs, per_item, dk, dv;

  void pair(int64_t p) const {
    const int64_t state = p * dk * dv;
    head(Head{q + p * dk, k + p * dk, v + p * dv, decay[p], beta[p], s_in + state, s_out + state, out + p * dv,
              dk, dv});
  }
  static void run(const void* self, int64_t item) {
    const Job& job = *static_cast<const Job*>(self);
    const int64_t end = std::min(job.pairs, (item + 1) * job.per_item);
    for (int64_t p = item * job.per_item; p < end; ++p) job.pair(p);
  }
};

ffi::Error DeltaRuleStepImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                             ffi::Buffer<ffi::F32> decay, ffi::Buffer<ffi::F32> beta, ffi::Buffer<ffi::F32> state,
                             ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> new_state) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), gd = decay.dimensions(),
       bd = beta.dimensions(), sd = state.dimensions(), od = out->dimensions(), nd = new_state->dimensions();
  if (qd.size() != 3 || kd.size() != 3 || vd.size() != 3 || gd.size() != 2 || bd.size() != 2 || sd.size() != 4 ||
      od.size() != 3 || nd.size() != 4)
    return ffi::Error::InvalidArgument(
        "delta_rule_step: expected q, k [B, H, dk], v [B, H, dv], decay, beta [B, H], state [B, H, dk, dv]");
  const int64_t B = sd[0], H = sd[1], dk = sd[2], dv = sd[3];
  bool ok = true;
  for (auto d : {qd, kd}) ok = ok && d[0] == B && d[1] == H && d[2] == dk;
  for (auto d : {vd, od}) ok = ok && d[0] == B && d[1] == H && d[2] == dv;
  for (auto d : {gd, bd}) ok = ok && d[0] == B && d[1] == H;
  for (int a = 0; a < 4; ++a) ok = ok && nd[a] == sd[a];
  if (!ok) return ffi::Error::InvalidArgument("delta_rule_step: shapes of q, k, v, decay, beta and state disagree");
  const int64_t pairs = B * H, size = std::max<int64_t>(dk * dv, 1);
  const Job job{q.typed_data(),     k.typed_data(),       v.typed_data(),   decay.typed_data(),
                beta.typed_data(),  state.typed_data(),   new_state->typed_data(), out->typed_data(),
                pairs,              std::max<int64_t>(1, kItemState / size), dk, dv};
  const int64_t count = (pairs + job.per_item - 1) / job.per_item;
  const bool shared = count > 1 && count <= kMaxItems && pairs * size >= kSharedState && Pool::get()->workers() > 0;
  if (shared && Pool::get()->run(&Job::run, &job, count)) return ffi::Error::Success();
  for (int64_t i = 0; i < count; ++i) Job::run(&job, i);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace qwen_kernels

XLA_FFI_DEFINE_HANDLER_SYMBOL(QwenDeltaRuleStep, qwen_kernels::DeltaRuleStepImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
