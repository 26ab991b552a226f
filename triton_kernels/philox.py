"""The Philox4x32-10 + Box-Muller normal noise in Triton (the contract: fastdiff/philox.py; the same
float32 polynomials as csrc/include/fastdiff/philox.cuh). Philox itself is Triton's ``tl.philox``."""

import triton
import triton.language as tl


@triton.jit
def uniform_open(w):
    """uint32 -> ((w >> 9) + 0.5) * 2**-23, exact: never 0 or 1."""
    return (w >> 9).to(tl.float32) * 1.1920928955078125e-07 + 5.960464477539063e-08


@triton.jit
def log_pos(v):
    """ln v for positive normal floats (Cephes logf)."""
    b = v.to(tl.uint32, bitcast=True)
    e = ((b >> 23).to(tl.int32) - 126).to(tl.float32)
    m = ((b & 0x007FFFFF) | 0x3F000000).to(tl.float32, bitcast=True)
    small = m < 0.70710678118654752
    e = tl.where(small, e - 1.0, e)
    f = tl.where(small, m + m, m) - 1.0
    z = f * f
    y = 7.0376836292e-2 * f - 1.1514610310e-1
    y = y * f + 1.1676998740e-1
    y = y * f - 1.2420140846e-1
    y = y * f + 1.4249322787e-1
    y = y * f - 1.6668057665e-1
    y = y * f + 2.0000714765e-1
    y = y * f - 2.4999993993e-1
    y = y * f + 3.3333331174e-1
    y = y * f * z
    y = y - 2.12194440e-4 * e
    y = y - 0.5 * z
    return (f + y) + 0.693359375 * e


@triton.jit
def sincos_2pi(u):
    """(cos 2*pi*u, sin 2*pi*u): exact quadrant from 4u, Cephes polynomials on [-pi/4, pi/4]."""
    t = 4.0 * u
    q = (t + 0.5).to(tl.int32)
    a = (t - q.to(tl.float32)) * 1.57079632679489662
    z = a * a
    s = ((-1.9515295891e-4 * z + 8.3321608736e-3) * z - 1.6666654611e-1) * z * a + a
    c = ((2.443315711809948e-5 * z - 1.388731625493765e-3) * z + 4.166664568298827e-2) * z * z - 0.5 * z + 1.0
    k = q & 3
    cos = tl.where(k == 0, c, tl.where(k == 1, -s, tl.where(k == 2, -c, s)))
    sin = tl.where(k == 0, s, tl.where(k == 1, c, tl.where(k == 2, -s, -c)))
    return cos, sin


@triton.jit
def normal_block(seed, g0, step, domain, BLOCK: tl.constexpr):
    """The BLOCK normals of elements 4*g0 ... 4*g0 + BLOCK - 1 of a sample keyed by `seed` (int64)."""
    g = g0 + tl.arange(0, BLOCK // 4).to(tl.int64)
    c0 = (g & 0xFFFFFFFF).to(tl.uint32)
    c1 = (g >> 32).to(tl.uint32)
    c2 = tl.zeros_like(c0) + step.to(tl.uint32)
    c3 = tl.zeros_like(c0) + domain.to(tl.uint32)
    w0, w1, w2, w3 = tl.philox(seed, c0, c1, c2, c3)
    r01 = tl.sqrt_rn(-2.0 * log_pos(uniform_open(w0)))
    cos01, sin01 = sincos_2pi(uniform_open(w1))
    r23 = tl.sqrt_rn(-2.0 * log_pos(uniform_open(w2)))
    cos23, sin23 = sincos_2pi(uniform_open(w3))
    # interleave to z[4g + j]: join(join(z0, z2), join(z1, z3)) is [G, 2, 2] with [g, l, m] = z[2l + m]
    z = tl.join(tl.join(r01 * cos01, r23 * cos23), tl.join(r01 * sin01, r23 * sin23))
    return tl.reshape(z, [BLOCK])
