// iicl_fast._C: a bank of LoRA adapters trained together.
//
// Segmented LoRA: the tokens of a batch are cut into segments (offsets [S+1], int64), segment
// s belongs to adapter ids[s]; y[t] = scale * B_a (A_a x[t]) for the token's adapter a, with
// A [n, r, d_in] and B [n, d_out, r] the bank's (fp32 master) weights and x in the compute
// dtype (bf16 or fp32). Tokens outside every segment get y = 0. Backward gives grad_x and
// dense grad_A / grad_B (fp32, zero for adapters with no tokens).
//
// Masked AdamW: torch.optim.AdamW's update applied to the active adapters only, each with its
// own step count, learning rate, weight decay and gradient clip by its own norm over all
// the bank's tensors. Inactive adapters and their moments are not touched.
//
// This file is the CPU implementation (segments walked on the host: CPU tensors have no
// host/device boundary to synchronise across) and the module definition. lora_bank_cuda.cu
// holds the CUDA kernels (masked AdamW; segmented LoRA on tensor cores for bf16 activations
// and ranks 16..64 in steps of 16), compiled in (IICL_WITH_CUDA) when setup.py finds nvcc and
// a CUDA build of torch.
#include <torch/extension.h>

#include <cmath>
#include <string>
#include <vector>

#ifdef IICL_WITH_CUDA
at::Tensor per_adapter_sq_norm_cuda(const std::vector<at::Tensor>& grads);
void masked_adamw_step_cuda(std::vector<at::Tensor> params, std::vector<at::Tensor> grads,
                            std::vector<at::Tensor> exp_avg, std::vector<at::Tensor> exp_avg_sq, at::Tensor step,
                            const at::Tensor& active, const at::Tensor& lr, const at::Tensor& weight_decay,
                            double beta1, double beta2, double eps, double max_grad_norm);
at::Tensor slot_table_cuda(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                           const std::vector<at::Tensor>& exp_avg, const std::vector<at::Tensor>& exp_avg_sq);
void masked_adamw_step_table(const at::Tensor& slots, int64_t n_tensors, at::Tensor step, const at::Tensor& active,
                             const at::Tensor& lr, const at::Tensor& weight_decay, double beta1, double beta2,
                             double eps, double max_grad_norm);
std::vector<at::Tensor> segmented_lora_forward_cuda(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                                                    const at::Tensor& offsets, const at::Tensor& adapter_ids,
                                                    double scale, const c10::optional<at::Tensor>& base);
std::vector<at::Tensor> segmented_lora_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& u,
                                                     const at::Tensor& A, const at::Tensor& B,
                                                     const at::Tensor& offsets, const at::Tensor& adapter_ids,
                                                     double scale, bool need_grad_x);
constexpr bool kWithCuda = true;
#else
constexpr bool kWithCuda = false;
#endif

namespace {

void check(bool ok, const std::string& msg) { TORCH_CHECK(ok, "iicl_fast._C: ", msg); }

void check_tensor(const at::Tensor& t, const char* name, int64_t dim, const at::Device& dev) {
  check(t.defined(), std::string(name) + " is undefined");
  check(t.dim() == dim, std::string(name) + " must have " + std::to_string(dim) + " dimensions, got " +
                            std::to_string(t.dim()));
  check(t.device() == dev, std::string(name) + " is on " + t.device().str() + ", expected " + dev.str());
}

void check_cpu(const at::Tensor& t, const char* name) {
  check(t.device().is_cpu(), std::string(name) + " is on " + t.device().str() +
                                 (kWithCuda ? ", the other inputs on the CPU: put them on one device"
                                            : ": this build of iicl_fast._C has CPU kernels only"));
}

// Validates the segment description and returns it on the host.
std::pair<std::vector<int64_t>, std::vector<int64_t>> segments(const at::Tensor& offsets, const at::Tensor& ids,
                                                               int64_t n_tokens, int64_t n_adapters) {
  check(offsets.scalar_type() == at::kLong, "offsets must be int64");
  check(ids.scalar_type() == at::kLong, "adapter_ids must be int64");
  check(offsets.dim() == 1 && ids.dim() == 1, "offsets and adapter_ids must be 1-D");
  check(offsets.numel() == ids.numel() + 1, "offsets must have one more entry than adapter_ids (got " +
                                                std::to_string(offsets.numel()) + " and " +
                                                std::to_string(ids.numel()) + ")");
  auto off_c = offsets.contiguous();
  auto ids_c = ids.contiguous();
  std::vector<int64_t> off(off_c.data_ptr<int64_t>(), off_c.data_ptr<int64_t>() + off_c.numel());
  std::vector<int64_t> ad(ids_c.data_ptr<int64_t>(), ids_c.data_ptr<int64_t>() + ids_c.numel());
  for (size_t s = 0; s < ad.size(); ++s) {
    check(ad[s] >= 0 && ad[s] < n_adapters, "adapter id " + std::to_string(ad[s]) + " (segment " +
                                                std::to_string(s) + ") is out of range for a bank of " +
                                                std::to_string(n_adapters) + " adapters");
    check(off[s] >= 0 && off[s] <= off[s + 1] && off[s + 1] <= n_tokens,
          "offsets must be non-decreasing within [0, " + std::to_string(n_tokens) + "]");
  }
  return {off, ad};
}

void check_bank(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B) {
  check_cpu(x, "x");
  check_tensor(A, "A", 3, x.device());
  check_tensor(B, "B", 3, x.device());
  check(x.dim() == 2, "x must be [tokens, d_in], got " + std::to_string(x.dim()) + " dimensions");
  check(x.is_floating_point(), "x must be floating point");
  check(A.scalar_type() == B.scalar_type(), "A and B must have the same dtype");
  check(A.size(0) == B.size(0), "A and B must hold the same number of adapters");
  check(A.size(2) == x.size(1), "A is [n, r, " + std::to_string(A.size(2)) + "] but x has d_in " +
                                    std::to_string(x.size(1)));
  check(B.size(2) == A.size(1), "B's rank " + std::to_string(B.size(2)) + " differs from A's " +
                                    std::to_string(A.size(1)));
}

}  // namespace

// -> (y [T, d_out] in x's dtype, u = A_a x [T, r] in x's dtype, saved for backward)
// base (optional, [T, d_out] in x's dtype): y = base + the adapters' output, in one pass on CUDA.
std::vector<at::Tensor> segmented_lora_forward(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                                               const at::Tensor& offsets, const at::Tensor& adapter_ids,
                                               double scale, const c10::optional<at::Tensor>& base) {
#ifdef IICL_WITH_CUDA
  if (x.is_cuda()) return segmented_lora_forward_cuda(x, A, B, offsets, adapter_ids, scale, base);
#endif
  check_bank(x, A, B);
  auto [off, ad] = segments(offsets, adapter_ids, x.size(0), A.size(0));
  auto y = at::zeros({x.size(0), B.size(1)}, x.options());
  auto u = at::zeros({x.size(0), A.size(1)}, x.options());
  for (size_t s = 0; s < ad.size(); ++s) {
    int64_t len = off[s + 1] - off[s];
    if (len == 0) continue;
    auto xs = x.narrow(0, off[s], len);
    auto us = at::matmul(xs, A[ad[s]].to(x.scalar_type()).t());
    u.narrow(0, off[s], len).copy_(us);
    y.narrow(0, off[s], len).copy_(at::matmul(us, B[ad[s]].to(x.scalar_type()).t()).mul_(scale));
  }
  if (base.has_value() && base->defined()) {
    check(base->sizes() == y.sizes(), "base must be [tokens, d_out]");
    y.add_(*base);
  }
  return {y, u};
}

// -> (grad_x [T, d_in] (undefined unless need_grad_x), grad_A [n, r, d_in], grad_B [n, d_out, r]) in A's dtype
std::vector<at::Tensor> segmented_lora_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& u,
                                                const at::Tensor& A, const at::Tensor& B, const at::Tensor& offsets,
                                                const at::Tensor& adapter_ids, double scale, bool need_grad_x) {
#ifdef IICL_WITH_CUDA
  if (x.is_cuda()) return segmented_lora_backward_cuda(grad_y, x, u, A, B, offsets, adapter_ids, scale, need_grad_x);
#endif
  check_bank(x, A, B);
  check_tensor(grad_y, "grad_y", 2, x.device());
  check_tensor(u, "u", 2, x.device());
  check(grad_y.size(0) == x.size(0) && grad_y.size(1) == B.size(1), "grad_y must be [tokens, d_out]");
  check(u.size(0) == x.size(0) && u.size(1) == A.size(1), "u must be [tokens, r]");
  auto [off, ad] = segments(offsets, adapter_ids, x.size(0), A.size(0));
  auto acc = A.scalar_type();
  auto gA = at::zeros_like(A, at::MemoryFormat::Contiguous);
  auto gB = at::zeros_like(B, at::MemoryFormat::Contiguous);
  at::Tensor gx = need_grad_x ? at::zeros({x.size(0), x.size(1)}, x.options()) : at::Tensor();
  auto gy_all = grad_y.to(x.scalar_type());   // any strides: narrow + matmul read them as they are
  for (size_t s = 0; s < ad.size(); ++s) {
    int64_t len = off[s + 1] - off[s];
    if (len == 0) continue;
    int64_t a = ad[s];
    auto gy = gy_all.narrow(0, off[s], len).to(acc);
    auto us = u.narrow(0, off[s], len).to(acc);
    auto xs = x.narrow(0, off[s], len).to(acc);
    gB[a].add_(at::matmul(gy.t(), us), scale);                // [d_out, r]
    auto gu = at::matmul(gy, B[a].to(acc)).mul_(scale);        // [len, r]
    gA[a].add_(at::matmul(gu.t(), xs));                        // [r, d_in]
    if (need_grad_x) gx.narrow(0, off[s], len).copy_(at::matmul(gu, A[a].to(acc)));
  }
  return {gx, gA, gB};
}

// Per-adapter sum of squared gradients over all the bank's tensors (each [n, ...]) -> [n] fp32.
at::Tensor per_adapter_sq_norm(const std::vector<at::Tensor>& grads) {
  check(!grads.empty(), "grads is empty");
#ifdef IICL_WITH_CUDA
  if (grads[0].is_cuda()) return per_adapter_sq_norm_cuda(grads);
#endif
  int64_t n = grads[0].size(0);
  auto out = at::zeros({n}, grads[0].options().dtype(at::kFloat));
  for (size_t i = 0; i < grads.size(); ++i) {
    const auto& g = grads[i];
    check_cpu(g, "grads[i]");
    check(g.size(0) == n, "grads[" + std::to_string(i) + "] holds " + std::to_string(g.size(0)) +
                              " adapters, grads[0] " + std::to_string(n));
    out.add_(g.reshape({n, -1}).to(at::kFloat).pow(2).sum(1));
  }
  return out;
}

// torch.optim.AdamW (no amsgrad, not maximize) on the active adapters of every tensor of the
// bank, after clipping each active adapter's gradient by its own norm. step is incremented
// for active adapters. lr, weight_decay: [n] fp32 (per adapter).
void masked_adamw_step(std::vector<at::Tensor> params, std::vector<at::Tensor> grads, std::vector<at::Tensor> exp_avg,
                       std::vector<at::Tensor> exp_avg_sq, at::Tensor step, const at::Tensor& active,
                       const at::Tensor& lr, const at::Tensor& weight_decay, double beta1, double beta2, double eps,
                       double max_grad_norm) {
  size_t k = params.size();
  check(k > 0, "params is empty");
  check(grads.size() == k && exp_avg.size() == k && exp_avg_sq.size() == k,
        "params, grads, exp_avg and exp_avg_sq must be lists of the same length");
#ifdef IICL_WITH_CUDA
  if (params[0].is_cuda())
    return masked_adamw_step_cuda(params, grads, exp_avg, exp_avg_sq, step, active, lr, weight_decay, beta1, beta2,
                                  eps, max_grad_norm);
#endif
  int64_t n = params[0].size(0);
  check_cpu(step, "step");
  check(step.scalar_type() == at::kLong && step.dim() == 1 && step.numel() == n, "step must be int64 [n_adapters]");
  check(active.scalar_type() == at::kBool && active.dim() == 1 && active.numel() == n,
        "active must be a bool mask [n_adapters] (got " + std::to_string(active.numel()) + " entries for " +
            std::to_string(n) + " adapters)");
  check(lr.numel() == n && weight_decay.numel() == n, "lr and weight_decay must have one entry per adapter");
  for (size_t i = 0; i < k; ++i) {
    auto nm = std::to_string(i);
    check_cpu(params[i], "params[i]");
    check(params[i].size(0) == n, "params[" + nm + "] holds a different number of adapters");
    check(grads[i].sizes() == params[i].sizes(), "grads[" + nm + "] does not match params[" + nm + "]'s shape");
    check(exp_avg[i].sizes() == params[i].sizes() && exp_avg_sq[i].sizes() == params[i].sizes(),
          "exp_avg / exp_avg_sq[" + nm + "] do not match params[" + nm + "]'s shape");
    check(params[i].is_contiguous() && exp_avg[i].is_contiguous() && exp_avg_sq[i].is_contiguous(),
          "params and moments must be contiguous (tensor " + nm + ")");
  }
  auto act = active.contiguous();
  auto lr_c = lr.to(at::kDouble).contiguous();
  auto wd_c = weight_decay.to(at::kDouble).contiguous();
  at::Tensor sq = max_grad_norm > 0 ? per_adapter_sq_norm(grads) : at::Tensor();
  auto* st = step.data_ptr<int64_t>();
  for (int64_t a = 0; a < n; ++a) {
    if (!act.data_ptr<bool>()[a]) continue;
    double clip = 1.0;
    if (max_grad_norm > 0) {   // torch.nn.utils.clip_grad_norm_: coef = max / (norm + 1e-6), capped at 1
      double norm = std::sqrt(sq[a].item<double>());
      clip = std::min(1.0, max_grad_norm / (norm + 1e-6));
    }
    int64_t t = ++st[a];
    double lr_a = lr_c.data_ptr<double>()[a], wd_a = wd_c.data_ptr<double>()[a];
    double bc1 = 1.0 - std::pow(beta1, (double)t);
    double bc2_sqrt = std::sqrt(1.0 - std::pow(beta2, (double)t));
    for (size_t i = 0; i < k; ++i) {
      auto p = params[i][a];
      auto g = grads[i][a].to(p.scalar_type());
      if (clip < 1.0) g = g.mul(clip);
      auto m = exp_avg[i][a];
      auto v = exp_avg_sq[i][a];
      p.mul_(1.0 - lr_a * wd_a);
      m.lerp_(g, 1.0 - beta1);
      v.mul_(beta2).addcmul_(g, g, 1.0 - beta2);
      auto denom = (v.sqrt() / bc2_sqrt).add_(eps);
      p.addcdiv_(m, denom, -lr_a / bc1);
    }
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "iicl_fast._C: segmented multi-adapter LoRA and a masked per-adapter AdamW (CPU; CUDA when built with nvcc)";
  m.attr("with_cuda") = kWithCuda;
  m.def("segmented_lora_forward", &segmented_lora_forward, "y, u = (base +) scale * B_a(A_a x) per segment",
        py::arg("x"), py::arg("A"), py::arg("B"), py::arg("offsets"), py::arg("adapter_ids"), py::arg("scale"),
        py::arg("base") = py::none());
  m.def("segmented_lora_backward", &segmented_lora_backward, "grad_x, grad_A, grad_B");
  m.def("per_adapter_sq_norm", &per_adapter_sq_norm, "sum of squared gradients per adapter");
  m.def("masked_adamw_step", &masked_adamw_step, "AdamW on the active adapters only");
#ifdef IICL_WITH_CUDA
  m.def("slot_table", &slot_table_cuda, "device table of the bank's (param, grad, moments) pointers");
  m.def("masked_adamw_step_table", &masked_adamw_step_table,
        "masked AdamW through a slot table: no host sync, no copy (CUDA-graph capturable)");
#endif
}
