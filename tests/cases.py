"""Random step cases shared by the CPU and GPU tests: coefficients and inputs for a set of terms, and
the float64 torch reference every backend is held to."""

import math

import torch

from fastdiff import layout as L
from fastdiff.ops.step import reference_outputs, validate
from fastdiff.random import sample_seeds

CONFIGS = {
    "ddim": dict(n_e=1, clamp=True, n_out=2),
    "guided-two-outputs": dict(n_e=2, guided=True),
    "multistep": dict(n_e=1, n_m=3, last=True, n_out=3),
    "gmm": dict(n_e=1, row=True, var=True, noise="philox", n_out=2),
    "mix-ddpm": dict(n_e=1, offset=True, noise="tensor"),
    "noise-only": dict(x=False, n_e=0, noise="philox"),
    "everything": dict(n_e=2, guided=True, n_m=3, last=True, offset=True, row=True, var=True, noise="philox",
                       clamp=True, n_out=3),
}
SHAPES = [(3, 5, 17, 19), (2, 4, 8, 8), (1, 7), (5, 1030)]


def make_case(cfg, shape, dtype=torch.float32, *, rows="one", seed=0, noncontig=False, device="cpu"):
    """Random coefficients and inputs for the terms of `cfg`; returns ops.step kwargs."""
    g = torch.Generator().manual_seed(seed)
    B, K, R = shape[0], 3, 5
    coef = torch.randn(R, L.NUM_COEF, generator=g)
    coef[:, L.R] = 0.5 + torch.rand(R, generator=g)
    coef[:, L.VAR] = 3.0 * torch.rand(R, generator=g)  # some variances clip at 0

    def big():
        t = torch.randn(shape, generator=g).to(dtype)
        if noncontig:  # same values, strided memory
            t = t.transpose(0, -1).contiguous().transpose(0, -1)
        return t

    kw = dict(coef=coef, clamp=cfg.get("clamp", False), n_out=cfg.get("n_out", 1))
    if cfg.get("x", True):
        kw["x"] = big()
    else:
        kw["shape"] = shape
    n_e = cfg.get("n_e", 1)
    kw["e"] = [big() for _ in range(n_e)]
    if cfg.get("guided"):
        kw["e_uncond"] = [big() for _ in range(n_e)]
    kw["m"] = [big() for _ in range(cfg.get("n_m", 0))]
    if cfg.get("last"):
        kw["x_last"] = big()
    if cfg.get("offset"):
        kw["offset"] = torch.randn(B, generator=g)
    if cfg.get("row") or cfg.get("var"):
        kw["idx"] = torch.randint(0, K, (B,), generator=g)
    if cfg.get("row"):
        kw["row_table"] = torch.randn(K, *shape[1:], generator=g)
    if cfg.get("var"):
        kw["var_table"] = 3.0 * torch.rand(K, math.prod(shape[1:]), generator=g)
    if cfg.get("noise") == "tensor":
        kw["noise"] = big()
    elif cfg.get("noise") == "philox":
        kw["seeds"] = sample_seeds(seed, B)
        kw["noise_step"], kw["noise_stream"] = 7, 1
    if rows == "one":
        kw["row"] = 3
    elif rows == "per-sample":
        kw["rows"] = torch.randint(0, R, (B,), generator=g)
    else:
        kw["rows"] = torch.tensor([1])
    return to_device(kw, device)


def to_device(kw, device):
    """The same case with every tensor on `device`."""
    def move(v):
        if isinstance(v, torch.Tensor):
            return v.to(device)
        if isinstance(v, list):
            return [move(t) for t in v]
        return v

    return {k: move(v) for k, v in kw.items()}


def reference64(kw):
    """The reference computed in float64 on the CPU: the oracle every backend is held to."""
    return reference_outputs(validate(**to_device(kw, "cpu")), torch.float64, torch.float64)
