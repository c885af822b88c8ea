// One decode step's gated attention on the CPU (one query per row over the row's cached keys), as an XLA FFI custom
// call, batch-invariant by construction: each (row, KV head) is computed by the same loops whatever the batch, the
// cache length or the other rows.
//
// Inputs: q [B, Hkv, G, D] (the G query heads that read KV head h), keys and values [B, T, Hkv, D], all fp32 or all
// bf16; key_mask [B, T] int32 (1: a real key) and slot [B] int32 (the query's own slot: it sees the real keys at
// slots <= its own); the attribute scale (fp32 D^-0.5, as the XLA path multiplies by). Output out [B, Hkv, G, D] fp32 (the caller rounds it to the activation dtype).
// Per query, with the roundings of HF's eager path (``qwen_jax.attention._scores``; X() rounds to the activation
// dtype, the identity in fp32):
//   s_t = X(X(q . k_t) * scale) over the visible keys t;  m = max_t s_t;  e_t = exp(s_t - m);  sum = sum_t e_t;
//   out = sum_t X(e_t / sum) v_t,
// a query that sees no key gets zeros. Orders, none depending on the batch or on the vector width:
// - q . k_t: 16 partial chains of fused multiply-adds, chain j over d = j, j + 16, ... in order from zero, then
//   the 16 partials added pairwise (j and j + 8, then j and j + 4, ...): the same on AVX-512 (one vector), AVX2
//   (two) and the scalar path;
// - sum: plain adds over t in order; m: a max (exact);
// - out[d]: one chain of fused multiply-adds over t in order from zero (vectorised across d).
// exp is the C library's expf (correctly rounded to within an ulp; XLA's own exp is not callable from here): the
// step's numbers differ from the XLA path's in the last bits, as any two orders do. Build without -ffast-math,
// with -ffp-contract=off.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "pool.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// Inside the namespace of simd.h and pool.h: their names (fma, load, Pool, ...) come before the C library's.
namespace qwen_kernels {
namespace {

// X(): rounds an fp32 value to the element type T (round to nearest even, as XLA's and torch's conversions), back
// in fp32. The identity for fp32.
inline float rounded(float v, float) { return v; }
inline float rounded(float v, bf16) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return v;  // NaN stays NaN
  bits = (bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u;
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

constexpr int kChains = 16;  // partial chains of a dot product

// q . k over D elements as kChains partial chains added pairwise (see the header): chain j in lane j of
// kChains / kWidth vectors.
template <typename T>
float dot(const float* q, const T* k, int64_t D) {
  constexpr int kVecs = kChains / kWidth;
  Vec acc[kVecs];
  for (int c = 0; c < kVecs; ++c) acc[c] = zero();
  int64_t d = 0;
  for (; d + kChains <= D; d += kChains)
    for (int c = 0; c < kVecs; ++c) acc[c] = fma(load(q + d + c * kWidth), load(k + d + c * kWidth), acc[c]);
  float partial[kChains];
  for (int c = 0; c < kVecs; ++c) store(partial + c * kWidth, acc[c]);
  for (; d < D; ++d) partial[d % kChains] = std::fmaf(q[d], to_f32(k[d]), partial[d % kChains]);
  for (int width = kChains / 2; width >= 1; width /= 2)
    for (int j = 0; j < width; ++j) partial[j] = partial[j] + partial[j + width];
  return partial[0];
}

// out[0:D] = fma(p, v[0:D], out[0:D]): one step of each element's chain over the keys.
template <typename T>
void accumulate(float p, const T* v, float* out, int64_t D) {
  const Vec pv = broadcast(p);
  int64_t d = 0;
  for (; d + kWidth <= D; d += kWidth) store(out + d, fma(pv, load(v + d), load(out + d)));
  for (; d < D; ++d) out[d] = std::fmaf(p, to_f32(v[d]), out[d]);
}

template <typename T>
struct Job {
  const T *q, *k, *v;
  const int32_t *key_mask, *slot;
  float* out;
  int64_t T_, Hkv, G, D;
  float scale;

  // One (row, KV head): its G queries over the row's visible keys.
  void pair(int64_t pair) const {
    const int64_t b = pair / Hkv, h = pair % Hkv;
    const int64_t last = std::min<int64_t>(T_ - 1, slot[b]);  // the keys past the query's slot are not read
    thread_local std::vector<float> scores, query;
    scores.resize(size_t(std::max<int64_t>(last + 1, 0) * G));
    query.resize(size_t(G * D));
    const T* qh = q + (b * Hkv + h) * G * D;
    for (int64_t i = 0; i < G * D; ++i) query[i] = to_f32(qh[i]);
    float* out_h = out + (b * Hkv + h) * G * D;
    std::fill(out_h, out_h + G * D, 0.0f);
    const T tag{};  // selects rounded()'s overload
    std::vector<float> max(G, -std::numeric_limits<float>::infinity()), sum(G, 0.0f);
    bool any = false;
    for (int64_t t = 0; t <= last; ++t) {
      if (key_mask[b * T_ + t] <= 0) continue;
      any = true;
      const T* kt = k + (b * T_ + t) * Hkv * D + h * D;
      for (int64_t g = 0; g < G; ++g) {
        const float s = rounded(rounded(dot(query.data() + g * D, kt, D), tag) * scale, tag);
        scores[t * G + g] = s;
        max[g] = std::max(max[g], s);
      }
    }
    if (!any) return;
    for (int64_t t = 0; t <= last; ++t) {
      if (key_mask[b * T_ + t] <= 0) continue;
      for (int64_t g = 0; g < G; ++g) {
        const float e = std::exp(scores[t * G + g] - max[g]);
        scores[t * G + g] = e;
        sum[g] = sum[g] + e;
      }
    }
    for (int64_t t = 0; t <= last; ++t) {
      if (key_mask[b * T_ + t] <= 0) continue;
      const T* vt = v + (b * T_ + t) * Hkv * D + h * D;
      for (int64_t g = 0; g < G; ++g) accumulate(rounded(scores[t * G + g] / sum[g], tag), vt, out_h + g * D, D);
    }
  }
  static void run(const void* self, int64_t item) { static_cast<const Job*>(self)->pair(item); }
};

// Keys and values read per call above which the (row, KV head) pairs are shared with the pool's workers.
constexpr int64_t kSharedBytes = int64_t(1) << 20;

template <typename T>
ffi::Error attend(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, const int32_t* key_mask, const int32_t* slot,
                  float* out, int64_t B, int64_t T_, int64_t Hkv, int64_t G, int64_t D, float scale) {
  const Job<T> job{static_cast<const T*>(q.untyped_data()), static_cast<const T*>(k.untyped_data()),
                   static_cast<const T*>(v.untyped_data()), key_mask, slot, out, T_, Hkv, G, D, scale};
  const int64_t pairs = B * Hkv;
  int64_t read = 0;
  for (int64_t b = 0; b < B; ++b) read += std::min<int64_t>(T_, std::max<int64_t>(slot[b] + 1, 0));
  read *= Hkv * D * 2 * int64_t(sizeof(T));
  const bool shared = pairs > 1 && pairs <= kMaxItems && read >= kSharedBytes && Pool::get()->workers() > 0;
  if (shared && Pool::get()->run(&Job<T>::run, &job, pairs)) return ffi::Error::Success();
  for (int64_t i = 0; i < pairs; ++i) job.pair(i);
  return ffi::Error::Success();
}

ffi::Error DecodeAttentionImpl(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::Buffer<ffi::S32> key_mask,
                               ffi::Buffer<ffi::S32> slot, ffi::ResultBuffer<ffi::F32> out, float scale) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), md = key_mask.dimensions(),
       sd = slot.dimensions(), od = out->dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || md.size() != 2 || sd.size() != 1 || od.size() != 4)
    return ffi::Error::InvalidArgument(
        "decode_attention: expected q [B, Hkv, G, D], keys and values [B, T, Hkv, D], key_mask [B, T], slot [B]");
  const int64_t B = qd[0], Hkv = qd[1], G = qd[2], D = qd[3], T_ = kd[1];
  bool ok = kd[0] == B && kd[2] == Hkv && kd[3] == D && md[0] == B && md[1] == T_ && sd[0] == B;
  for (int a = 0; a < 4; ++a) ok = ok && vd[a] == kd[a] && od[a] == qd[a];
  if (!ok) return ffi::Error::InvalidArgument("decode_attention: shapes of q, keys, values, key_mask and slot disagree");
  if (q.element_type() != k.element_type() || v.element_type() != k.element_type())
    return ffi::Error::InvalidArgument("decode_attention: q, keys and values must have one dtype");
  switch (k.element_type()) {
    case ffi::DataType::F32:
      return attend<float>(q, k, v, key_mask.typed_data(), slot.typed_data(), out->typed_data(), B, T_, Hkv, G, D, scale);
    case ffi::DataType::BF16:
      return attend<bf16>(q, k, v, key_mask.typed_data(), slot.typed_data(), out->typed_data(), B, T_, Hkv, G, D, scale);
    default:
      return ffi::Error::InvalidArgument("decode_attention: q, keys and values must be float32 or bfloat16");
  }
}

}  // namespace
}  // namespace qwen_kernels

XLA_FFI_DEFINE_HANDLER_SYMBOL(QwenDecodeAttention, qwen_kernels::DecodeAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));
