// rewardctl's fused CPU kernels: SwiGLU (silu(gate) * up), the RMS norm and the rotary position
// embedding, forward and backward, each
// one pass over its tensors instead of the 2-6 element-wise operators (and as many round trips to
// memory) that autograd runs for them. Built once per machine by rewardctl/kernels/build.py.
//
// Numerics follow torch's own CPU kernels: ATen's Vectorized<float> (the same Sleef exp), silu as
// x / (1 + exp(-x)) and its gradient as dy * sig * (1 + x * (1 - sig)) (Activation.cpp), bf16 inputs
// widened to fp32, and every intermediate that autograd would store in the input dtype (silu's output,
// the gradient reaching silu) rounded to that dtype here too, so SwiGLU in bf16 is bit for bit what
// autograd computes. The RMS norm reduces in another order than torch's composite ops: equal within
// fp32 rounding.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <tuple>
#include <vector>

namespace {

using at::vec::Vectorized;
using Vf = Vectorized<float>;

// Two float vectors per block: a bf16 vector widens into two.
constexpr int64_t STEP = 2 * Vf::size();
// Elements per task of at::parallel_for.
constexpr int64_t GRAIN = 8192;

template <typename T>
inline void load2(const T* p, Vf& a, Vf& b);
template <>
inline void load2<float>(const float* p, Vf& a, Vf& b) {
  a = Vf::loadu(p);
  b = Vf::loadu(p + Vf::size());
}
template <>
inline void load2<at::BFloat16>(const at::BFloat16* p, Vf& a, Vf& b) {
  std::tie(a, b) = at::vec::convert_to_float<at::BFloat16>(Vectorized<at::BFloat16>::loadu(p));
}

template <typename T>
inline void store2(T* p, Vf a, Vf b);
template <>
inline void store2<float>(float* p, Vf a, Vf b) {
  a.store(p);
  b.store(p + Vf::size());
}
template <>
inline void store2<at::BFloat16>(at::BFloat16* p, Vf a, Vf b) {
  at::vec::convert_from_float<at::BFloat16>(a, b).store(p);
}

// What an intermediate holds once stored in dtype T and read back.
template <typename T>
inline void round2(Vf& a, Vf& b);
template <>
inline void round2<float>(Vf&, Vf&) {}
template <>
inline void round2<at::BFloat16>(Vf& a, Vf& b) {
  std::tie(a, b) = at::vec::convert_to_float<at::BFloat16>(at::vec::convert_from_float<at::BFloat16>(a, b));
}

// body(in, out) on every block of STEP elements of n, in parallel; a shorter tail goes through
// zero-padded scratch blocks so the body stays vectorised.
template <typename T, size_t NIN, size_t NOUT, class Body>
void for_blocks(const std::array<const T*, NIN>& in, const std::array<T*, NOUT>& out, int64_t n, Body body) {
  at::parallel_for(0, n, GRAIN, [&](int64_t begin, int64_t end) {
    std::array<const T*, NIN> bin;
    std::array<T*, NOUT> bout;
    int64_t i = begin;
    for (; i + STEP <= end; i += STEP) {
      for (size_t k = 0; k < NIN; ++k) bin[k] = in[k] + i;
      for (size_t k = 0; k < NOUT; ++k) bout[k] = out[k] + i;
      body(bin, bout);
    }
    if (i < end) {
      const int64_t rest = end - i;
      T scratch_in[NIN][STEP];
      T scratch_out[NOUT][STEP];
      for (size_t k = 0; k < NIN; ++k) {
        std::fill(scratch_in[k], scratch_in[k] + STEP, T(0));
        std::copy(in[k] + i, in[k] + end, scratch_in[k]);
        bin[k] = scratch_in[k];
      }
      for (size_t k = 0; k < NOUT; ++k) bout[k] = scratch_out[k];
      body(bin, bout);
      for (size_t k = 0; k < NOUT; ++k) std::copy(scratch_out[k], scratch_out[k] + rest, out[k] + i);
    }
  });
}

template <typename T>
void swiglu_forward_impl(const T* gate, const T* up, T* out, int64_t n) {
  for_blocks<T, 2, 1>({gate, up}, {out}, n, [](const std::array<const T*, 2>& in, const std::array<T*, 1>& o) {
    Vf g0, g1, u0, u1;
    load2<T>(in[0], g0, g1);
    load2<T>(in[1], u0, u1);
    const Vf one(1.0f);
    Vf s0 = g0 / (one + g0.neg().exp()), s1 = g1 / (one + g1.neg().exp());
    round2<T>(s0, s1);  // silu's output, stored in T by autograd
    store2<T>(o[0], s0 * u0, s1 * u1);
  });
}

template <typename T>
void swiglu_backward_impl(const T* grad, const T* gate, const T* up, T* grad_gate, T* grad_up, int64_t n) {
  for_blocks<T, 3, 2>(
      {grad, gate, up}, {grad_gate, grad_up}, n, [](const std::array<const T*, 3>& in, const std::array<T*, 2>& o) {
        Vf d0, d1, g0, g1, u0, u1;
        load2<T>(in[0], d0, d1);
        load2<T>(in[1], g0, g1);
        load2<T>(in[2], u0, u1);
        const Vf one(1.0f);
        const Vf e0 = one + g0.neg().exp(), e1 = one + g1.neg().exp();
        Vf s0 = g0 / e0, s1 = g1 / e1;
        round2<T>(s0, s1);
        store2<T>(o[1], d0 * s0, d1 * s1);  // d(up) = grad * silu(gate)
        Vf ds0 = d0 * u0, ds1 = d1 * u1;   // d(silu) = grad * up, stored in T by autograd
        round2<T>(ds0, ds1);
        const Vf q0 = one / e0, q1 = one / e1;
        // torch's compiler contracts 1 + x * (1 - sig) into one fused multiply-add (this file is
        // built without contraction, -ffp-contract=off, so it is written out here).
        store2<T>(o[0], ds0 * q0 * at::vec::fmadd(g0, one - q0, one), ds1 * q1 * at::vec::fmadd(g1, one - q1, one));
      });
}

// Rotary position embedding of one (heads, dim) row: out = x * cos + rotate_half(x) * sin with
// rotate_half(x) = cat(-x[half:], x[:half]); each product rounded to T before the sum, as autograd's
// separate multiplies store them. backward = true computes the input's gradient instead:
// g * cos + (g * sin rotated back: +g[i + half] * sin[i + half] below half, -g[i - half] * sin[i - half] above).
template <typename T, bool BACKWARD>
void rotary_row(const T* x, const T* c, const T* s, T* out, int64_t heads, int64_t dim) {
  const int64_t half = dim / 2;
  if (half % STEP == 0) {
    for (int64_t h = 0; h < heads; ++h) {
      const T* xh = x + h * dim;
      T* oh = out + h * dim;
      for (int64_t i = 0; i < half; i += STEP) {
        Vf a0, a1, b0, b1, ca0, ca1, cb0, cb1, sa0, sa1, sb0, sb1;
        load2<T>(xh + i, a0, a1);          // first half
        load2<T>(xh + half + i, b0, b1);   // second half
        load2<T>(c + i, ca0, ca1);
        load2<T>(c + half + i, cb0, cb1);
        load2<T>(s + i, sa0, sa1);
        load2<T>(s + half + i, sb0, sb1);
        Vf pa0 = a0 * ca0, pa1 = a1 * ca1, pb0 = b0 * cb0, pb1 = b1 * cb1;
        round2<T>(pa0, pa1);
        round2<T>(pb0, pb1);
        if (!BACKWARD) {  // first: a*c - b*s; second: b*c + a*s
          Vf qa0 = b0 * sa0, qa1 = b1 * sa1, qb0 = a0 * sb0, qb1 = a1 * sb1;
          round2<T>(qa0, qa1);
          round2<T>(qb0, qb1);
          store2<T>(oh + i, pa0 - qa0, pa1 - qa1);
          store2<T>(oh + half + i, pb0 + qb0, pb1 + qb1);
        } else {  // first: a*c + b*s_second; second: b*c - a*s_first
          Vf qa0 = b0 * sb0, qa1 = b1 * sb1, qb0 = a0 * sa0, qb1 = a1 * sa1;
          round2<T>(qa0, qa1);
          round2<T>(qb0, qb1);
          store2<T>(oh + i, pa0 + qa0, pa1 + qa1);
          store2<T>(oh + half + i, pb0 - qb0, pb1 - qb1);
        }
      }
    }
    return;
  }
  for (int64_t h = 0; h < heads; ++h) {  // a head width the vector blocks do not divide
    const T* xh = x + h * dim;
    T* oh = out + h * dim;
    for (int64_t i = 0; i < half; ++i) {
      const float a = float(xh[i]), b = float(xh[half + i]);
      const float pa = float(T(a * float(c[i]))), pb = float(T(b * float(c[half + i])));
      if (!BACKWARD) {
        oh[i] = T(pa - float(T(b * float(s[i]))));
        oh[half + i] = T(pb + float(T(a * float(s[half + i]))));
      } else {
        oh[i] = T(pa + float(T(b * float(s[half + i]))));
        oh[half + i] = T(pb - float(T(a * float(s[i]))));
      }
    }
  }
}

template <typename T, bool BACKWARD>
void rotary_impl(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& out) {
  const int64_t batch = x.size(0), length = x.size(1), heads = x.size(2), dim = x.size(3);
  const int64_t table_batch = cos.size(0);
  const T* xp = x.const_data_ptr<T>();
  const T* cp = cos.const_data_ptr<T>();
  const T* sp = sin.const_data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, batch * length, std::max<int64_t>(1, GRAIN / (heads * dim)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t table_row = (table_batch == 1 ? 0 : r / length) * length + r % length;
      rotary_row<T, BACKWARD>(xp + r * heads * dim, cp + table_row * dim, sp + table_row * dim, op + r * heads * dim,
                              heads, dim);
    }
  });
}

void check_pair(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), "rewardctl fused kernels run on CPU tensors only");
  TORCH_CHECK(a.sizes() == b.sizes(), "shapes differ: ", a.sizes(), " and ", b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "dtypes differ");
  TORCH_CHECK(a.scalar_type() == at::kFloat || a.scalar_type() == at::kBFloat16, "float32 or bfloat16 only");
}

}  // namespace

// silu(gate) * up.
at::Tensor swiglu_forward(const at::Tensor& gate_, const at::Tensor& up_) {
  check_pair(gate_, up_);
  const auto gate = gate_.contiguous(), up = up_.contiguous();
  auto out = at::empty_like(gate);
  if (gate.scalar_type() == at::kBFloat16) {
    swiglu_forward_impl<at::BFloat16>(gate.const_data_ptr<at::BFloat16>(), up.const_data_ptr<at::BFloat16>(),
                                      out.data_ptr<at::BFloat16>(), gate.numel());
  } else {
    swiglu_forward_impl<float>(gate.const_data_ptr<float>(), up.const_data_ptr<float>(), out.data_ptr<float>(),
                               gate.numel());
  }
  return out;
}

// (d gate, d up) of silu(gate) * up given the output's gradient.
std::vector<at::Tensor> swiglu_backward(const at::Tensor& grad_, const at::Tensor& gate_, const at::Tensor& up_) {
  check_pair(gate_, up_);
  const auto grad = grad_.to(gate_.scalar_type()).contiguous(), gate = gate_.contiguous(), up = up_.contiguous();
  TORCH_CHECK(grad.sizes() == gate.sizes(), "gradient shape differs from the input's");
  auto grad_gate = at::empty_like(gate), grad_up = at::empty_like(up);
  if (gate.scalar_type() == at::kBFloat16) {
    swiglu_backward_impl<at::BFloat16>(grad.const_data_ptr<at::BFloat16>(), gate.const_data_ptr<at::BFloat16>(),
                                       up.const_data_ptr<at::BFloat16>(), grad_gate.data_ptr<at::BFloat16>(),
                                       grad_up.data_ptr<at::BFloat16>(), gate.numel());
  } else {
    swiglu_backward_impl<float>(grad.const_data_ptr<float>(), gate.const_data_ptr<float>(), up.const_data_ptr<float>(),
                                grad_gate.data_ptr<float>(), grad_up.data_ptr<float>(), gate.numel());
  }
  return {grad_gate, grad_up};
}

// y = weight * (x * rstd), rstd = 1 / sqrt(mean(x^2) + eps) over the last dimension; fp32 only.
// Returns (y, rstd) with rstd one value per row, kept for the backward.
std::vector<at::Tensor> rms_norm_forward(const at::Tensor& x_, const at::Tensor& weight_, double eps) {
  TORCH_CHECK(x_.device().is_cpu() && x_.scalar_type() == at::kFloat && weight_.scalar_type() == at::kFloat,
              "the fused RMS norm takes fp32 CPU tensors");
  const auto x = x_.contiguous(), weight = weight_.contiguous();
  const int64_t width = x.size(-1), rows = x.numel() / width;
  TORCH_CHECK(weight.numel() == width, "weight has ", weight.numel(), " values for rows of ", width);
  auto y = at::empty_like(x);
  auto rstd = at::empty({rows}, x.options());
  const float* xp = x.const_data_ptr<float>();
  const float* wp = weight.const_data_ptr<float>();
  float* yp = y.data_ptr<float>();
  float* rp = rstd.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = xp + r * width;
      float* yr = yp + r * width;
      float squares = 0.f;
#pragma omp simd reduction(+ : squares)
      for (int64_t i = 0; i < width; ++i) squares += xr[i] * xr[i];
      const float rs = 1.0f / std::sqrt(squares / float(width) + float(eps));
      rp[r] = rs;
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) yr[i] = wp[i] * (xr[i] * rs);
    }
  });
  return {y, rstd};
}

// (dx, dweight) of rms_norm_forward: dx = rstd * (w * dy) - x * rstd^3 * mean(w * dy * x),
// dweight = sum over rows of dy * x * rstd (per-thread partial sums, added at the end).
std::vector<at::Tensor> rms_norm_backward(const at::Tensor& grad_, const at::Tensor& x_, const at::Tensor& weight_,
                                          const at::Tensor& rstd_) {
  const auto grad = grad_.to(at::kFloat).contiguous(), x = x_.contiguous(), weight = weight_.contiguous(),
             rstd = rstd_.contiguous();
  const int64_t width = x.size(-1), rows = x.numel() / width;
  TORCH_CHECK(grad.numel() == x.numel(), "gradient size differs from the input's");
  auto grad_x = at::empty_like(x);
  auto partial = at::zeros({at::get_num_threads(), width}, x.options());
  const float* xp = x.const_data_ptr<float>();
  const float* wp = weight.const_data_ptr<float>();
  const float* gp = grad.const_data_ptr<float>();
  const float* rp = rstd.const_data_ptr<float>();
  float* dxp = grad_x.data_ptr<float>();
  float* pp = partial.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    float* dw = pp + at::get_thread_num() * width;
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = xp + r * width;
      const float* gr = gp + r * width;
      float* dxr = dxp + r * width;
      const float rs = rp[r];
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t i = 0; i < width; ++i) dot += wp[i] * gr[i] * xr[i];
      const float c = dot * rs * rs * rs / float(width);
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) {
        dxr[i] = wp[i] * gr[i] * rs - xr[i] * c;
        dw[i] += gr[i] * (xr[i] * rs);
      }
    }
  });
  return {grad_x, partial.sum(0)};
}

// x (B, L, heads, dim) with cos / sin (B or 1, L, dim) of x's dtype: x * cos + rotate_half(x) * sin,
// or with backward = true the gradient of x given the output's gradient in x's place.
at::Tensor rotary(const at::Tensor& x_, const at::Tensor& cos_, const at::Tensor& sin_, bool backward) {
  TORCH_CHECK(x_.dim() == 4 && cos_.dim() == 3 && cos_.sizes() == sin_.sizes(), "x (B, L, heads, dim), cos/sin (B or 1, L, dim)");
  TORCH_CHECK(cos_.size(1) == x_.size(1) && cos_.size(2) == x_.size(3) && x_.size(3) % 2 == 0, "rotary table shape");
  TORCH_CHECK(cos_.size(0) == 1 || cos_.size(0) == x_.size(0), "rotary table batch");
  check_pair(cos_, sin_);
  TORCH_CHECK(x_.scalar_type() == cos_.scalar_type(), "x and its rotary tables must share a dtype");
  const auto x = x_.contiguous(), cos = cos_.contiguous(), sin = sin_.contiguous();
  auto out = at::empty_like(x);
  if (x.scalar_type() == at::kBFloat16) {
    backward ? rotary_impl<at::BFloat16, true>(x, cos, sin, out) : rotary_impl<at::BFloat16, false>(x, cos, sin, out);
  } else {
    backward ? rotary_impl<float, true>(x, cos, sin, out) : rotary_impl<float, false>(x, cos, sin, out);
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rotary", &rotary, "x * cos + rotate_half(x) * sin over (B, L, heads, dim), or its input gradient");
  m.def("swiglu_forward", &swiglu_forward, "silu(gate) * up");
  m.def("swiglu_backward", &swiglu_backward, "(d gate, d up) of silu(gate) * up");
  m.def("rms_norm_forward", &rms_norm_forward, "(y, rstd) of the RMS norm over the last dimension");
  m.def("rms_norm_backward", &rms_norm_backward, "(dx, dweight) of the RMS norm");
}
