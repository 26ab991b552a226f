// The coefficient row of a step plan: one float32 row per step (or per step and sample). Kernels read
// their coefficients from this row in device memory, never as baked-in scalars, so a captured CUDA graph
// stays right when the plan is refilled in place. What each column multiplies: the glossary in
// docs/architecture.md ("The step's terms"). Mirrors fastdiff/layout.py; fastdiff.backends refuses a
// module whose layout differs from Python's.
#pragma once

namespace fastdiff {

// Row-level coefficients:
//   e_i = (1 - G)*uncond_i + G*cond_i                     (classifier-free guidance, when on)
//   x0  = clamp(AS*(AX*x + AE0*e_0 + AE1*e_1), -R, R)     (data prediction; clamp when requested; the
//                                                          scale AS keeps eps-prediction's cancellation
//                                                          at the size of x, as (x - sigma*e)/alpha does)
//   s   = sqrt(max(VAR - var_table[k_n, i], 0))           (gathered noise std, DDIM-GMM; else 1)
enum Coef : int { kG = 0, kAS, kAX, kAE0, kAE1, kR, kVar, kOut };

// Per output k (k = 0..2) at kOut + k*kPerOut:
//   out_k = CX*x + CE0*e_0 + CE1*e_1 + CX0*x0 + CM0*m_0 + CM1*m_1 + CM2*m_2 + CLAST*x_last
//         + COFF*offset[n] + CDELTA*delta_table[k_n, i] + CZ*s*z
// An input whose weight is 0 is not read (it contributes exactly 0, even inf or NaN).
enum OutCoef : int { kCX = 0, kCE0, kCE1, kCX0, kCM0, kCM1, kCM2, kCLast, kCOff, kCDelta, kCZ, kPerOut };

constexpr int kMaxOut = 3;
constexpr int kNumCoef = 40;  // kOut + kMaxOut*kPerOut
static_assert(kOut + kMaxOut * kPerOut == kNumCoef, "coefficient row layout");

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

}  // namespace fastdiff
