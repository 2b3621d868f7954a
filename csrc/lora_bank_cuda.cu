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
