// iicl_fast._C, CUDA part: the masked per-adapter AdamW over a bank of LoRA adapters.
//
// The bank holds k stacked tensors (one per adapted module and factor), each [n, ...] with
// `per` elements per adapter. Three launches per step, whatever k and n:
//   1. per-adapter squared gradient norm over all k tensors (one block per (adapter, tensor),
//      a block reduction, one atomicAdd per block) -- only when clipping;
//   2. the AdamW update of every active adapter's slice of every tensor (same grid);
//   3. step[a] += 1 for the active adapters.
// Inactive adapters are skipped by whole blocks: their weights and moments are never written.
// In torch, the same masked update (gather / scatter per tensor, 420 tensors) took 175 ms per
// step for 256 adapters of a 135M model on an H100, against 22 ms for fused AdamW over
// everything; this kernel reads and writes each active element once.
#include <torch/extension.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstring>
#include <string>
#include <vector>

namespace {

struct Slot {
  float* p;
  const float* g;
  float* m;
  float* v;
  int64_t per;   // elements per adapter
  int vec4;      // 1: every adapter's slice is 16-byte aligned (per % 4 == 0, aligned bases)
};

constexpr int kThreads = 256;

__device__ float block_sum(float x) {
  __shared__ float part[kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) part[warp] = x;
  __syncthreads();
  x = threadIdx.x < kThreads / 32 ? part[threadIdx.x] : 0.f;
  if (warp == 0)
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

__global__ void __launch_bounds__(kThreads) sq_norm_kernel(const Slot* __restrict__ slots,
                                                           const bool* __restrict__ active,
                                                           float* __restrict__ sq) {
  const int64_t a = blockIdx.x;
  if (active != nullptr && !active[a]) return;
  const Slot s = slots[blockIdx.y];
  const float* g = s.g + a * s.per;
  float acc = 0.f;
  if (s.vec4) {
    const float4* g4 = reinterpret_cast<const float4*>(g);
    for (int64_t i = threadIdx.x; i < s.per / 4; i += kThreads) {
      float4 x = g4[i];
      acc += x.x * x.x + x.y * x.y + x.z * x.z + x.w * x.w;
    }
  } else {
    for (int64_t i = threadIdx.x; i < s.per; i += kThreads) acc += g[i] * g[i];
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) atomicAdd(sq + a, acc);
}

// 1 - beta is taken in double on the host, as torch.optim.AdamW does: in float,
// 1 - 0.999f differs from float(0.001) by 1.3e-5 relative (seen in exp_avg_sq against torch).
struct Hyper {
  float beta2, one_minus_beta1, one_minus_beta2, eps, max_norm;
  double beta1_d, beta2_d;
};

__device__ __forceinline__ void adamw_one(float& p, float g, float& m, float& v, float decay, const Hyper& hp,
                                          float step_size, float bc2_sqrt) {
  p *= decay;
  m += hp.one_minus_beta1 * (g - m);   // torch's lerp(m, g, 1 - beta1) for a weight below 0.5
  v = v * hp.beta2 + hp.one_minus_beta2 * g * g;
  p -= step_size * m / (sqrtf(v) / bc2_sqrt + hp.eps);
}

__global__ void __launch_bounds__(kThreads) adamw_kernel(const Slot* __restrict__ slots,
                                                         const bool* __restrict__ active,
                                                         const int64_t* __restrict__ step,
                                                         const float* __restrict__ lr,
                                                         const float* __restrict__ weight_decay,
                                                         const float* __restrict__ sq, Hyper hp) {
  const int64_t a = blockIdx.x;
  if (!active[a]) return;
  const Slot s = slots[blockIdx.y];
  const double t = static_cast<double>(step[a] + 1);
  const float bc1 = static_cast<float>(1.0 - pow(hp.beta1_d, t));
  const float bc2_sqrt = static_cast<float>(sqrt(1.0 - pow(hp.beta2_d, t)));
  float clip = 1.f;   // torch.nn.utils.clip_grad_norm_: max / (norm + 1e-6), capped at 1
  if (hp.max_norm > 0.f) clip = fminf(1.f, hp.max_norm / (sqrtf(sq[a]) + 1e-6f));
  const float step_size = lr[a] / bc1;
  const float decay = 1.f - lr[a] * weight_decay[a];
  const int64_t off = a * s.per;
  if (s.vec4) {
    float4* p4 = reinterpret_cast<float4*>(s.p + off);
    const float4* g4 = reinterpret_cast<const float4*>(s.g + off);
    float4* m4 = reinterpret_cast<float4*>(s.m + off);
    float4* v4 = reinterpret_cast<float4*>(s.v + off);
    for (int64_t i = threadIdx.x; i < s.per / 4; i += kThreads) {
      float4 p = p4[i], g = g4[i], m = m4[i], v = v4[i];
      adamw_one(p.x, g.x * clip, m.x, v.x, decay, hp, step_size, bc2_sqrt);
      adamw_one(p.y, g.y * clip, m.y, v.y, decay, hp, step_size, bc2_sqrt);
      adamw_one(p.z, g.z * clip, m.z, v.z, decay, hp, step_size, bc2_sqrt);
      adamw_one(p.w, g.w * clip, m.w, v.w, decay, hp, step_size, bc2_sqrt);
      p4[i] = p;
      m4[i] = m;
      v4[i] = v;
    }
  } else {
    for (int64_t i = threadIdx.x; i < s.per; i += kThreads) {
      float p = s.p[off + i], m = s.m[off + i], v = s.v[off + i];
      adamw_one(p, s.g[off + i] * clip, m, v, decay, hp, step_size, bc2_sqrt);
      s.p[off + i] = p;
      s.m[off + i] = m;
      s.v[off + i] = v;
    }
  }
}

__global__ void bump_step_kernel(int64_t* step, const bool* active, int64_t n) {
  int64_t a = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (a < n && active[a]) step[a] += 1;
}

void check(bool ok, const std::string& msg) { TORCH_CHECK(ok, "iicl_fast._C: ", msg); }

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

void check_f32(const at::Tensor& t, const std::string& name, const at::Device& dev, int64_t n) {
  check(t.defined(), name + " is undefined");
  check(t.device() == dev, name + " is on " + t.device().str() + ", expected " + dev.str());
  check(t.scalar_type() == at::kFloat, name + " must be float32 (the bank's masters), got " +
                                           std::string(c10::toString(t.scalar_type())));
  check(t.dim() >= 1 && t.size(0) == n, name + " must hold " + std::to_string(n) + " adapters in dim 0");
}

// Builds the slot table on the device. grads are made contiguous (a copy only if they are not).
at::Tensor slot_table(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                      const std::vector<at::Tensor>& exp_avg, const std::vector<at::Tensor>& exp_avg_sq,
                      std::vector<at::Tensor>& keep) {
  const auto dev = params[0].device();
  const int64_t n = params[0].size(0);
  std::vector<Slot> host(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const std::string nm = "[" + std::to_string(i) + "]";
    check_f32(params[i], "params" + nm, dev, n);
    check_f32(grads[i], "grads" + nm, dev, n);
    check_f32(exp_avg[i], "exp_avg" + nm, dev, n);
    check_f32(exp_avg_sq[i], "exp_avg_sq" + nm, dev, n);
    check(grads[i].sizes() == params[i].sizes(), "grads" + nm + " does not match params" + nm + "'s shape");
    check(exp_avg[i].sizes() == params[i].sizes() && exp_avg_sq[i].sizes() == params[i].sizes(),
          "exp_avg / exp_avg_sq" + nm + " do not match params" + nm + "'s shape");
    check(params[i].is_contiguous() && exp_avg[i].is_contiguous() && exp_avg_sq[i].is_contiguous(),
          "params and moments must be contiguous (tensor " + std::to_string(i) + ")");
    at::Tensor g = grads[i].contiguous();
    keep.push_back(g);
    Slot s{params[i].data_ptr<float>(), g.data_ptr<float>(), exp_avg[i].data_ptr<float>(),
           exp_avg_sq[i].data_ptr<float>(), params[i].numel() / n, 0};
    s.vec4 = s.per % 4 == 0 && aligned16(s.p) && aligned16(s.g) && aligned16(s.m) && aligned16(s.v);
    host[i] = s;
  }
  auto bytes = at::empty({static_cast<int64_t>(host.size() * sizeof(Slot))}, at::TensorOptions().dtype(at::kByte));
  std::memcpy(bytes.data_ptr(), host.data(), host.size() * sizeof(Slot));
  return bytes.to(dev);
}

}  // namespace

at::Tensor per_adapter_sq_norm_cuda(const std::vector<at::Tensor>& grads) {
  check(!grads.empty(), "grads is empty");
  const auto dev = grads[0].device();
  const int64_t n = grads[0].size(0);
  c10::cuda::CUDAGuard guard(dev);
  // the slot table wants four pointers per tensor: the gradient stands in for all of them (read only)
  std::vector<at::Tensor> g(grads.begin(), grads.end()), keep;
  auto slots = slot_table(g, g, g, g, keep);
  auto sq = at::zeros({n}, grads[0].options().dtype(at::kFloat));
  dim3 grid(static_cast<unsigned>(n), static_cast<unsigned>(grads.size()));
  sq_norm_kernel<<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const Slot*>(slots.data_ptr()), nullptr, sq.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return sq;
}

at::Tensor slot_table_cuda(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                           const std::vector<at::Tensor>& exp_avg, const std::vector<at::Tensor>& exp_avg_sq) {
  check(params.size() < 65536, "at most 65535 tensors per bank");
  c10::cuda::CUDAGuard guard(params[0].device());
  std::vector<at::Tensor> keep;
  for (size_t i = 0; i < grads.size(); ++i)
    check(grads[i].is_contiguous(), "grads[" + std::to_string(i) + "] must be contiguous for a cached slot table");
  return slot_table(params, grads, exp_avg, exp_avg_sq, keep);
}

void masked_adamw_step_table(const at::Tensor& slots, int64_t n_tensors, at::Tensor step, const at::Tensor& active,
                             const at::Tensor& lr, const at::Tensor& weight_decay, double beta1, double beta2,
                             double eps, double max_grad_norm) {
  const auto dev = step.device();
  check(dev.is_cuda(), "step is on " + dev.str() + ": the slot-table update runs on CUDA");
  const int64_t n = step.numel();
  check(slots.device() == dev && slots.scalar_type() == at::kByte &&
            slots.numel() == n_tensors * static_cast<int64_t>(sizeof(Slot)),
        "slots must be the byte table slot_table built for " + std::to_string(n_tensors) + " tensors on " +
            dev.str());
  check(step.scalar_type() == at::kLong && step.dim() == 1 && step.is_contiguous(),
        "step must be a contiguous int64 [n_adapters] tensor");
  check(active.device() == dev && active.scalar_type() == at::kBool && active.numel() == n &&
            active.is_contiguous(),
        "active must be a contiguous bool mask [n_adapters] on " + dev.str() + " (got " +
            std::to_string(active.numel()) + " entries on " + active.device().str() + ")");
  check(lr.device() == dev && lr.scalar_type() == at::kFloat && lr.numel() == n && lr.is_contiguous(),
        "lr must be a contiguous float32 [n_adapters] tensor on " + dev.str());
  check(weight_decay.device() == dev && weight_decay.scalar_type() == at::kFloat && weight_decay.numel() == n &&
            weight_decay.is_contiguous(),
        "weight_decay must be a contiguous float32 [n_adapters] tensor on " + dev.str());
  c10::cuda::CUDAGuard guard(dev);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const Slot* table = reinterpret_cast<const Slot*>(slots.data_ptr());
  dim3 grid(static_cast<unsigned>(n), static_cast<unsigned>(n_tensors));
  // no host synchronisation and no host-to-device copy here: the step can be captured in a CUDA graph
  at::Tensor sq = at::zeros({n}, lr.options());
  if (max_grad_norm > 0) {
    sq_norm_kernel<<<grid, kThreads, 0, stream>>>(table, active.data_ptr<bool>(), sq.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  Hyper hp{static_cast<float>(beta2), static_cast<float>(1.0 - beta1), static_cast<float>(1.0 - beta2),
           static_cast<float>(eps), static_cast<float>(max_grad_norm), beta1, beta2};
  adamw_kernel<<<grid, kThreads, 0, stream>>>(table, active.data_ptr<bool>(), step.data_ptr<int64_t>(),
                                              lr.data_ptr<float>(), weight_decay.data_ptr<float>(),
                                              sq.data_ptr<float>(), hp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  bump_step_kernel<<<static_cast<unsigned>((n + 255) / 256), 256, 0, stream>>>(step.data_ptr<int64_t>(),
                                                                                active.data_ptr<bool>(), n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void masked_adamw_step_cuda(std::vector<at::Tensor> params, std::vector<at::Tensor> grads,
                            std::vector<at::Tensor> exp_avg, std::vector<at::Tensor> exp_avg_sq, at::Tensor step,
                            const at::Tensor& active, const at::Tensor& lr, const at::Tensor& weight_decay,
                            double beta1, double beta2, double eps, double max_grad_norm) {
  const auto dev = params[0].device();
  check(params.size() < 65536, "at most 65535 tensors per bank");
  check(step.device() == dev, "step is on " + step.device().str() + ", params on " + dev.str());
  c10::cuda::CUDAGuard guard(dev);
  std::vector<at::Tensor> keep;   // contiguous copies of grads, alive until the kernels are queued
  auto slots = slot_table(params, grads, exp_avg, exp_avg_sq, keep);
  masked_adamw_step_table(slots, static_cast<int64_t>(params.size()), step, active.contiguous(), lr.contiguous(),
                          weight_decay.contiguous(), beta1, beta2, eps, max_grad_norm);
}

// ---------------------------------------------------------------------------------------
// Segmented LoRA on CUDA: bf16 activations, fp32 master A [n, r, d_in] and B [n, d_out, r],
// r a multiple of 16 up to 64, tensor cores through WMMA (16x16x16 bf16 fragments, fp32
// accumulators). The batch's tokens are cut into tiles of 64 (4 warps x 16 tokens); a tile
// finds the segments it meets by a binary search in the device-side offsets (no host sync)
// and, for each, loads the adapter's weights and the tile with the rows of other segments
// zeroed, so the shrink/expand products of all its segments add up in the same fragments.
// The reductions over tokens (grad_A, grad_B) keep one product per (tile, segment) and add it
// into the adapter's gradient with atomics. In the bank, this replaces per layer: two
// gathers, two casts, two batched GEMMs and the add (forward), and twelve kernels of their
// backward, with 2 + 4 kernels.
#include <cuda_bf16.h>
#include <mma.h>

namespace {

namespace wmma = nvcuda::wmma;
using bf16 = __nv_bfloat16;

constexpr int kTile = 64;         // tokens per block (4 warps x 16)
constexpr int kChunk = 64;        // reduction chunk of the shrink products
constexpr int kLd = kChunk + 8;   // padded shared rows (bf16): 144 bytes
constexpr int kRMax = 64;
constexpr int kLdR = kRMax + 8;   // padded rank rows (bf16)
constexpr int kCols = 64;         // output columns per block (4 warps x 16, or 4 x 16 fragments)
constexpr int kLdF = kCols + 4;   // padded float staging rows
constexpr int kSplitK = 128;      // shrink: reduction length per block

// First segment s with off[s + 1] > t (S if none): segments are sorted, possibly empty.
__device__ int first_segment(const int64_t* off, int S, int64_t t) {
  int lo = 0, hi = S;
  while (lo < hi) {
    int mid = (lo + hi) / 2;
    if (off[mid + 1] > t) hi = mid; else lo = mid + 1;
  }
  return lo;
}

// out[t, j] += alpha * sum_k X[t, k] * M_a(k, j), j < r, for every token of a segment (out is
// zeroed by the caller; blocks along y take kSplitK-long pieces of k).
// M_a(k, j) = A[a][j][k] (forward, K = d_in) or B[a][k][j] (grad of u, K = d_out).
template <bool kFromB>
__global__ void __launch_bounds__(128) shrink_kernel(const bf16* __restrict__ X, int64_t sx0, int64_t sx1,
                                                     const float* __restrict__ W, int64_t K, int r,
                                                     const int64_t* __restrict__ off, const int64_t* __restrict__ ids,
                                                     int S, int64_t n, int64_t T, float alpha, float* __restrict__ out) {
  __shared__ __align__(32) bf16 xs[kTile * kLd];
  __shared__ __align__(32) bf16 ws[kRMax * kLd];       // [j][k]: col-major B fragments
  __shared__ __align__(32) float stage[kTile * (kRMax + 4)];
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kTile, t1 = min(T, t0 + kTile);
  // split K over blockIdx.y (partial products added with atomics into the zeroed output): one
  // block per token tile gave 128 blocks for 8,192 tokens and ran 180-210 us per call on an H100
  const int64_t k_begin = static_cast<int64_t>(blockIdx.y) * kSplitK, k_end = min(K, k_begin + kSplitK);
  const int warp = threadIdx.x / 32, R = r / 16;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kRMax / 16];
  for (int f = 0; f < kRMax / 16; ++f) wmma::fill_fragment(acc[f], 0.f);
  for (int s = first_segment(off, S, t0); s < S && off[s] < t1; ++s) {
    const int64_t lo = max(t0, off[s]), hi = min(t1, off[s + 1]), a = ids[s];
    if (lo >= hi || a < 0 || a >= n) continue;       // ids are validated on the host side
    const float* Wa = W + a * K * r;
    for (int64_t k0 = k_begin; k0 < k_end; k0 += kChunk) {
      for (int i = threadIdx.x; i < kTile * kChunk; i += blockDim.x) {
        const int row = i / kChunk, col = i % kChunk;
        const int64_t t = t0 + row, k = k0 + col;
        float v = (t >= lo && t < hi && k < k_end) ? __bfloat162float(X[t * sx0 + k * sx1]) : 0.f;
        xs[row * kLd + col] = __float2bfloat16(v);
      }
      for (int i = threadIdx.x; i < r * kChunk; i += blockDim.x) {
        int j, c;
        if (kFromB) { j = i % r; c = i / r; } else { j = i / kChunk; c = i % kChunk; }   // coalesced reads
        const int64_t k = k0 + c;
        float v = k < k_end ? (kFromB ? Wa[k * r + j] : Wa[static_cast<int64_t>(j) * K + k]) : 0.f;
        ws[j * kLd + c] = __float2bfloat16(v);
      }
      __syncthreads();
      for (int kk = 0; kk < kChunk; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> fa;
        wmma::load_matrix_sync(fa, xs + warp * 16 * kLd + kk, kLd);
        for (int f = 0; f < R; ++f) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> fb;
          wmma::load_matrix_sync(fb, ws + f * 16 * kLd + kk, kLd);
          wmma::mma_sync(acc[f], fa, fb, acc[f]);
        }
      }
      __syncthreads();
    }
  }
  for (int f = 0; f < R; ++f)
    wmma::store_matrix_sync(stage + warp * 16 * (kRMax + 4) + f * 16, acc[f], kRMax + 4, wmma::mem_row_major);
  __syncthreads();
  for (int i = threadIdx.x; i < kTile * r; i += blockDim.x) {
    const int row = i / r, j = i % r;
    const int64_t t = t0 + row;
    if (t < t1) atomicAdd(out + t * r + j, alpha * stage[row * (kRMax + 4) + j]);
  }
}

// Y[t, c] = base[t, c] + alpha * sum_j U[t, j] * N_a(j, c) for the tokens of a segment (base, or
// 0, elsewhere). N_a(j, c) = B[a][c][j] (forward, C = d_out) or A[a][j][c] (grad of x, C = d_in).
template <bool kFromA>
__global__ void __launch_bounds__(128) expand_kernel(const float* __restrict__ U, const float* __restrict__ W,
                                                     int64_t C, int r, const int64_t* __restrict__ off,
                                                     const int64_t* __restrict__ ids, int S, int64_t n, int64_t T,
                                                     float alpha, const bf16* __restrict__ base, int64_t sb0,
                                                     bf16* __restrict__ Y, bool vec8) {
  __shared__ __align__(32) bf16 us[kTile * kLdR];      // [t][j]: row-major A fragments
  __shared__ __align__(32) bf16 ns[kCols * kLdR];      // [c][j]: col-major B fragments
  __shared__ __align__(32) float stage[kTile * kLdF];
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kTile, t1 = min(T, t0 + kTile);
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kCols;
  const int warp = threadIdx.x / 32, R = r / 16;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kCols / 16];
  for (int f = 0; f < kCols / 16; ++f) wmma::fill_fragment(acc[f], 0.f);
  for (int s = first_segment(off, S, t0); s < S && off[s] < t1; ++s) {
    const int64_t lo = max(t0, off[s]), hi = min(t1, off[s + 1]), a = ids[s];
    if (lo >= hi || a < 0 || a >= n) continue;
    const float* Wa = W + a * C * r;
    for (int i = threadIdx.x; i < kTile * r; i += blockDim.x) {
      const int row = i / r, j = i % r;
      const int64_t t = t0 + row;
      us[row * kLdR + j] = __float2bfloat16((t >= lo && t < hi) ? U[t * r + j] : 0.f);
    }
    for (int i = threadIdx.x; i < kCols * r; i += blockDim.x) {
      int j, c;
      if (kFromA) { j = i / kCols; c = i % kCols; } else { j = i % r; c = i / r; }     // coalesced reads
      const int64_t cc = c0 + c;
      float v = cc < C ? (kFromA ? Wa[static_cast<int64_t>(j) * C + cc] : Wa[cc * r + j]) : 0.f;
      ns[c * kLdR + j] = __float2bfloat16(v);
    }
    __syncthreads();
    for (int kk = 0; kk < R * 16; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> fa;
      wmma::load_matrix_sync(fa, us + warp * 16 * kLdR + kk, kLdR);
      for (int f = 0; f < kCols / 16; ++f) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> fb;
        wmma::load_matrix_sync(fb, ns + f * 16 * kLdR + kk, kLdR);
        wmma::mma_sync(acc[f], fa, fb, acc[f]);
      }
    }
    __syncthreads();
  }
  for (int f = 0; f < kCols / 16; ++f)
    wmma::store_matrix_sync(stage + warp * 16 * kLdF + f * 16, acc[f], kLdF, wmma::mem_row_major);
  __syncthreads();
  if (vec8) {   // 8 columns (16 bytes) per thread and step: the scalar loop took ~50 us per call
    for (int i = threadIdx.x; i < kTile * kCols / 8; i += blockDim.x) {
      const int row = i / (kCols / 8), c = (i % (kCols / 8)) * 8;
      const int64_t t = t0 + row, cc = c0 + c;
      if (t >= t1 || cc >= C) continue;
      uint4 packed_base = base != nullptr ? *reinterpret_cast<const uint4*>(base + t * sb0 + cc) : make_uint4(0, 0, 0, 0);
      const bf16* b8 = reinterpret_cast<const bf16*>(&packed_base);
      uint4 packed;
      bf16* y8 = reinterpret_cast<bf16*>(&packed);
      for (int e = 0; e < 8; ++e) y8[e] = __float2bfloat16(alpha * stage[row * kLdF + c + e] + __bfloat162float(b8[e]));
      *reinterpret_cast<uint4*>(Y + t * C + cc) = packed;
    }
    return;
  }
  for (int i = threadIdx.x; i < kTile * kCols; i += blockDim.x) {
    const int row = i / kCols, c = i % kCols;
    const int64_t t = t0 + row, cc = c0 + c;
    if (t < t1 && cc < C) {
      float v = alpha * stage[row * kLdF + c];
      if (base != nullptr) v += __bfloat162float(base[t * sb0 + cc]);
      Y[t * C + cc] = __float2bfloat16(v);
    }
  }
}

// grad_B[a][o][j] += alpha * sum_t G[t, o] * U[t, j]    (kIsB; M = o, N = j, K = tokens)
// grad_A[a][j][i] += sum_t U[t, j] * G[t, i]            (!kIsB; M = j, N = i, K = tokens)
// G is grad_y (any strides) for B, x for A; U is u for B, grad_u for A. 64 columns of G per block.
template <bool kIsB>
__global__ void __launch_bounds__(128) reduce_kernel(const bf16* __restrict__ G, int64_t sg0, int64_t sg1,
                                                     int64_t C, const float* __restrict__ U, int r,
                                                     const int64_t* __restrict__ off,
                                                     const int64_t* __restrict__ ids, int S, int64_t n, int64_t T,
                                                     float alpha, float* __restrict__ grad, bool vec8) {
  __shared__ __align__(32) bf16 gs[kTile * (kCols + 8)];   // [t][c]
  __shared__ __align__(32) bf16 us[kTile * kLdR];          // [t][j]
  __shared__ __align__(32) float stage[kRMax * kLdF];      // B: [o][j] (64 x r); A: [j][i] (r x 64)
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kTile, t1 = min(T, t0 + kTile);
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kCols;
  const int warp = threadIdx.x / 32, R = r / 16, ldg = kCols + 8;
  for (int s = first_segment(off, S, t0); s < S && off[s] < t1; ++s) {
    const int64_t lo = max(t0, off[s]), hi = min(t1, off[s + 1]), a = ids[s];
    if (lo >= hi || a < 0 || a >= n) continue;
    if (vec8) {   // rows of G read 16 bytes at a time
      for (int i = threadIdx.x; i < kTile * kCols / 8; i += blockDim.x) {
        const int row = i / (kCols / 8), c = (i % (kCols / 8)) * 8;
        const int64_t t = t0 + row, cc = c0 + c;
        uint4 v = (t >= lo && t < hi && cc < C) ? *reinterpret_cast<const uint4*>(G + t * sg0 + cc) : make_uint4(0, 0, 0, 0);
        *reinterpret_cast<uint4*>(gs + row * ldg + c) = v;
      }
    } else {
      for (int i = threadIdx.x; i < kTile * kCols; i += blockDim.x) {
        const int row = i / kCols, c = i % kCols;
        const int64_t t = t0 + row, cc = c0 + c;
        gs[row * ldg + c] = (t >= lo && t < hi && cc < C) ? G[t * sg0 + cc * sg1] : __float2bfloat16(0.f);
      }
    }
    for (int i = threadIdx.x; i < kTile * r; i += blockDim.x) {
      const int row = i / r, j = i % r;
      const int64_t t = t0 + row;
      us[row * kLdR + j] = __float2bfloat16((t >= lo && t < hi) ? U[t * r + j] : 0.f);
    }
    __syncthreads();
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kRMax / 16];
    for (int f = 0; f < R; ++f) wmma::fill_fragment(acc[f], 0.f);
    for (int kk = 0; kk < kTile; kk += 16) {
      if (kIsB) {   // warp: 16 rows o; fragments over j
        wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::col_major> fa;   // (o, t) at t * ldg + o
        wmma::load_matrix_sync(fa, gs + kk * ldg + warp * 16, ldg);
        for (int f = 0; f < R; ++f) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> fb;   // (t, j) at t * kLdR + j
          wmma::load_matrix_sync(fb, us + kk * kLdR + f * 16, kLdR);
          wmma::mma_sync(acc[f], fa, fb, acc[f]);
        }
      } else {      // warp: 16 columns i; fragments over j
        wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> fb;     // (t, i) at t * ldg + i
        wmma::load_matrix_sync(fb, gs + kk * ldg + warp * 16, ldg);
        for (int f = 0; f < R; ++f) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::col_major> fa;   // (j, t) at t * kLdR + j
          wmma::load_matrix_sync(fa, us + kk * kLdR + f * 16, kLdR);
          wmma::mma_sync(acc[f], fa, fb, acc[f]);
        }
      }
    }
    for (int f = 0; f < R; ++f) {
      if (kIsB)
        wmma::store_matrix_sync(stage + warp * 16 * kLdF + f * 16, acc[f], kLdF, wmma::mem_row_major);
      else
        wmma::store_matrix_sync(stage + f * 16 * kLdF + warp * 16, acc[f], kLdF, wmma::mem_row_major);
    }
    __syncthreads();
    float* ga = grad + a * C * r;
    for (int i = threadIdx.x; i < kCols * r; i += blockDim.x) {
      if (kIsB) {          // grad_B[a][o][j], o = c0 + i / r
        const int o = i / r, j = i % r;
        if (c0 + o < C) atomicAdd(ga + (c0 + o) * r + j, alpha * stage[o * kLdF + j]);
      } else {             // grad_A[a][j][i]
        const int j = i / kCols, c = i % kCols;
        if (c0 + c < C) atomicAdd(ga + static_cast<int64_t>(j) * C + c0 + c, alpha * stage[j * kLdF + c]);
      }
    }
    __syncthreads();
  }
}

void check_seg_cuda(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, const at::Tensor& offsets,
                    const at::Tensor& ids) {
  const auto dev = x.device();
  check(x.scalar_type() == at::kBFloat16, "x must be bfloat16 on CUDA (the segmented kernels compute in bf16), got " +
                                              std::string(c10::toString(x.scalar_type())));
  check(x.dim() == 2, "x must be [tokens, d_in]");
  for (auto [t, name] : {std::pair<const at::Tensor*, const char*>{&A, "A"}, {&B, "B"}}) {
    check(t->device() == dev, std::string(name) + " is on " + t->device().str() + ", x on " + dev.str());
    check(t->scalar_type() == at::kFloat && t->dim() == 3 && t->is_contiguous(),
          std::string(name) + " must be a contiguous float32 [n, ...] bank (fp32 masters)");
  }
  check(offsets.device() == dev && ids.device() == dev, "offsets and adapter_ids must be on " + dev.str());
  check(offsets.scalar_type() == at::kLong && ids.scalar_type() == at::kLong && offsets.dim() == 1 && ids.dim() == 1,
        "offsets and adapter_ids must be 1-D int64");
  check(offsets.numel() == ids.numel() + 1, "offsets must have one more entry than adapter_ids");
  check(A.size(2) == x.size(1), "A is [n, r, " + std::to_string(A.size(2)) + "] but x has d_in " + std::to_string(x.size(1)));
  check(B.size(2) == A.size(1) && B.size(0) == A.size(0), "B must be [n, d_out, r] with A's n and r");
  check(A.size(1) % 16 == 0 && A.size(1) <= kRMax, "the CUDA kernels take a rank that is a multiple of 16 up to 64, got " +
                                                       std::to_string(A.size(1)));
  check(ids.numel() < (1 << 30), "too many segments");
}

}  // namespace

std::vector<at::Tensor> segmented_lora_forward_cuda(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                                                    const at::Tensor& offsets, const at::Tensor& adapter_ids,
                                                    double scale, const c10::optional<at::Tensor>& base) {
  check_seg_cuda(x, A, B, offsets, adapter_ids);
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t T = x.size(0), d_in = x.size(1), d_out = B.size(1), n = A.size(0);
  const int r = static_cast<int>(A.size(1)), S = static_cast<int>(adapter_ids.numel());
  auto off = offsets.contiguous();
  auto ids = adapter_ids.contiguous();
  auto u = at::zeros({T, r}, x.options().dtype(at::kFloat));
  auto y = at::empty({T, d_out}, x.options());
  const bf16* base_ptr = nullptr;
  int64_t sb0 = 0;
  at::Tensor base_c;
  if (base.has_value() && base->defined()) {
    check(base->sizes() == y.sizes() && base->scalar_type() == x.scalar_type() && base->device() == x.device(),
          "base must be [tokens, d_out] in x's dtype and device");
    base_c = base->stride(1) == 1 ? *base : base->contiguous();
    base_ptr = reinterpret_cast<const bf16*>(base_c.data_ptr());
    sb0 = base_c.stride(0);
  }
  if (T == 0) return {y, u};
  auto stream = c10::cuda::getCurrentCUDAStream();
  const unsigned tiles = static_cast<unsigned>((T + kTile - 1) / kTile);
  dim3 grid_s(tiles, static_cast<unsigned>((d_in + kSplitK - 1) / kSplitK));
  shrink_kernel<false><<<grid_s, 128, 0, stream>>>(reinterpret_cast<const bf16*>(x.data_ptr()), x.stride(0), x.stride(1),
                                                  A.data_ptr<float>(), d_in, r, off.data_ptr<int64_t>(),
                                                  ids.data_ptr<int64_t>(), S, n, T, 1.f, u.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  dim3 grid(tiles, static_cast<unsigned>((d_out + kCols - 1) / kCols));
  expand_kernel<false><<<grid, 128, 0, stream>>>(u.data_ptr<float>(), B.data_ptr<float>(), d_out, r,
                                                 off.data_ptr<int64_t>(), ids.data_ptr<int64_t>(), S, n, T,
                                                 static_cast<float>(scale), base_ptr, sb0,
                                                 reinterpret_cast<bf16*>(y.data_ptr()),
                                                 d_out % 8 == 0 && sb0 % 8 == 0 && aligned16(base_ptr) &&
                                                     aligned16(y.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, u};
}

std::vector<at::Tensor> segmented_lora_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& u,
                                                     const at::Tensor& A, const at::Tensor& B,
                                                     const at::Tensor& offsets, const at::Tensor& adapter_ids,
                                                     double scale, bool need_grad_x) {
  check_seg_cuda(x, A, B, offsets, adapter_ids);
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t T = x.size(0), d_in = x.size(1), d_out = B.size(1), n = A.size(0);
  const int r = static_cast<int>(A.size(1)), S = static_cast<int>(adapter_ids.numel());
  check(grad_y.device() == x.device() && grad_y.dim() == 2 && grad_y.size(0) == T && grad_y.size(1) == d_out,
        "grad_y must be [tokens, d_out] on x's device");
  check(u.device() == x.device() && u.scalar_type() == at::kFloat && u.is_contiguous() && u.size(0) == T &&
            u.size(1) == r,
        "u must be the float32 [tokens, r] the CUDA forward returned");
  auto gy = grad_y.scalar_type() == at::kBFloat16 ? grad_y : grad_y.to(at::kBFloat16);   // any strides
  auto off = offsets.contiguous();
  auto ids = adapter_ids.contiguous();
  auto gA = at::zeros_like(A);
  auto gB = at::zeros_like(B);
  at::Tensor gx = need_grad_x ? at::empty({T, d_in}, x.options()) : at::Tensor();
  if (T == 0) return {gx, gA, gB};
  auto gu = at::zeros({T, r}, u.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const unsigned tiles = static_cast<unsigned>((T + kTile - 1) / kTile);
  const bf16* gy_p = reinterpret_cast<const bf16*>(gy.data_ptr());
  const bf16* x_p = reinterpret_cast<const bf16*>(x.data_ptr());
  dim3 grid_s(tiles, static_cast<unsigned>((d_out + kSplitK - 1) / kSplitK));
  shrink_kernel<true><<<grid_s, 128, 0, stream>>>(gy_p, gy.stride(0), gy.stride(1), B.data_ptr<float>(), d_out, r,
                                                 off.data_ptr<int64_t>(), ids.data_ptr<int64_t>(), S, n, T,
                                                 static_cast<float>(scale), gu.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (need_grad_x) {
    dim3 grid(tiles, static_cast<unsigned>((d_in + kCols - 1) / kCols));
    expand_kernel<true><<<grid, 128, 0, stream>>>(gu.data_ptr<float>(), A.data_ptr<float>(), d_in, r,
                                                  off.data_ptr<int64_t>(), ids.data_ptr<int64_t>(), S, n, T, 1.f,
                                                  nullptr, 0, reinterpret_cast<bf16*>(gx.data_ptr()),
                                                  d_in % 8 == 0 && aligned16(gx.data_ptr()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  dim3 grid_b(tiles, static_cast<unsigned>((d_out + kCols - 1) / kCols));
  reduce_kernel<true><<<grid_b, 128, 0, stream>>>(gy_p, gy.stride(0), gy.stride(1), d_out, u.data_ptr<float>(), r,
                                                  off.data_ptr<int64_t>(), ids.data_ptr<int64_t>(), S, n, T,
                                                  static_cast<float>(scale), gB.data_ptr<float>(),
                                                  gy.stride(1) == 1 && gy.stride(0) % 8 == 0 && d_out % 8 == 0 &&
                                                      aligned16(gy.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  dim3 grid_a(tiles, static_cast<unsigned>((d_in + kCols - 1) / kCols));
  reduce_kernel<false><<<grid_a, 128, 0, stream>>>(x_p, x.stride(0), x.stride(1), d_in, gu.data_ptr<float>(), r,
                                                   off.data_ptr<int64_t>(), ids.data_ptr<int64_t>(), S, n, T, 1.f,
                                                   gA.data_ptr<float>(),
                                                   x.stride(1) == 1 && x.stride(0) % 8 == 0 && d_in % 8 == 0 &&
                                                       aligned16(x.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {gx, gA, gB};
}
