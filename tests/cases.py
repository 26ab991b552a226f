"""Random step cases shared by the step tests, and the independent oracle every backend is held to: the
step's formula (the glossary in docs/architecture.md) evaluated in numpy float64, sample by sample and
term by term - written apart from fastdiff.reference (the torch backend, itself under test)."""

import math

import numpy as np
import torch

from fastdiff import layout as L
from fastdiff.philox import randn, sample_seeds

CONFIGS = {
    "ddim": dict(n_e=1, clamp=True, n_out=2),
    "guided-two-outputs": dict(n_e=2, guided=True),
    "multistep": dict(n_e=1, n_m=3, last=True, n_out=3),
    "gmm": dict(n_e=1, delta=True, var=True, noise="philox", n_out=2),
    "mix-ddpm": dict(n_e=1, offset=True, noise="tensor"),
    "noise-only": dict(x=False, n_e=0, noise="philox"),
    "everything": dict(n_e=2, guided=True, n_m=3, last=True, offset=True, delta=True, var=True, noise="philox",
                       clamp=True, n_out=3),
}
SHAPES = [(3, 5, 17, 19), (2, 4, 8, 8), (1, 7), (5, 1030)]


def make_case(cfg, shape, dtype=torch.float32, *, rows="one", seed=0, noncontig=False, device="cpu", zeros=0.3):
    """Random coefficients and inputs for the terms of `cfg`; returns ops.step kwargs. A fraction `zeros`
    of the coefficients is 0 (so the "zero weight is not read" rule is exercised everywhere)."""
    g = torch.Generator().manual_seed(seed)
    B, K, R = shape[0], 3, 5
    coef = torch.randn(R, L.NUM_COEF, generator=g)
    coef[torch.rand(R, L.NUM_COEF, generator=g) < zeros] = 0.0
    coef[:, L.AS] = 0.5 + torch.rand(R, generator=g)
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
    if cfg.get("delta") or cfg.get("var"):
        kw["component"] = torch.randint(0, K, (B,), generator=g)
    if cfg.get("delta"):
        kw["delta_table"] = torch.randn(K, *shape[1:], generator=g)
    if cfg.get("var"):
        kw["var_table"] = 3.0 * torch.rand(K, math.prod(shape[1:]), generator=g)
    if cfg.get("noise") == "tensor":
        kw["noise"] = big()
    elif cfg.get("noise") == "philox":
        kw["seeds"] = sample_seeds(seed, B)
        kw["noise_step"], kw["noise_domain"] = 7, 1
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


def oracle(kw) -> list[torch.Tensor]:
    """The outputs of ops.step(**kw) by the formula, in float64 (noise: the Philox reference stream, whose
    own oracle is Random123's known answers)."""
    kw = to_device(kw, "cpu")
    coef = kw["coef"].double().numpy()
    ref = next(t for t in (kw.get("x"), *kw.get("e", []), kw.get("noise")) if t is not None) \
        if "shape" not in kw else None
    shape = tuple(ref.shape) if ref is not None else tuple(kw["shape"])
    B, D, n_out = shape[0], math.prod(shape[1:]), kw.get("n_out", 1)

    def flat(t):
        return None if t is None else t.double().numpy().reshape(B, D)

    if "rows" in kw:
        rows = kw["rows"].numpy()
        rows = np.repeat(rows, B) if len(rows) == 1 else rows
    else:
        rows = np.full(B, kw.get("row", 0))
    rows = np.where(rows < 0, rows + coef.shape[0], rows)
    x, e, m = flat(kw.get("x")), [flat(t) for t in kw.get("e", [])], [flat(t) for t in kw.get("m", [])]
    u = [flat(t) for t in kw["e_uncond"]] if kw.get("e_uncond") is not None else None
    last, z = flat(kw.get("x_last")), flat(kw.get("noise"))
    if kw.get("seeds") is not None:
        z = randn(kw["seeds"], D, step=kw.get("noise_step", 0), domain=kw.get("noise_domain", 0),
                  dtype=torch.float64).numpy()
    delta = kw["delta_table"].double().numpy().reshape(-1, D) if kw.get("delta_table") is not None else None
    var = kw["var_table"].double().numpy().reshape(-1, D) if kw.get("var_table") is not None else None
    out = np.zeros((n_out, B, D))
    with np.errstate(all="ignore"):
        for n in range(B):
            c = coef[rows[n]]

            def wv(w, v):  # a zero weight adds exactly 0, whatever v holds
                return 0.0 if w == 0 else w * v

            terms = []  # (value, weight in x0, column of its weight in an output, factor on that weight)
            if x is not None:
                terms.append((x[n], c[L.AX], L.CX, 1.0))
            for i, ei in enumerate(e):
                if u is None:
                    terms.append((ei[n], c[L.AE0 + i], L.CE0 + i, 1.0))
                else:
                    g = c[L.G]
                    terms += [(ei[n], g * c[L.AE0 + i], L.CE0 + i, g),
                              (u[i][n], (1 - g) * c[L.AE0 + i], L.CE0 + i, 1 - g)]
            x0 = c[L.AS] * sum(wv(a, v) for v, a, _, _ in terms)
            if kw.get("clamp"):
                x0 = np.minimum(np.maximum(x0, -c[L.R]), c[L.R])
            k = int(kw["component"][n]) if kw.get("component") is not None else 0
            bad_k = kw.get("component") is not None and not 0 <= k < (delta if delta is not None else var).shape[0]
            zn = None
            if z is not None:
                zn = z[n] * (np.sqrt(np.maximum(c[L.VAR] - var[k], 0.0)) if var is not None else 1.0)
            for j in range(n_out):
                cj = c[L.out(j, 0):L.out(j, 0) + L.PER_OUT]  # output j's weights, by term
                o = wv(cj[L.CX0], x0) + sum(wv(f * cj[t], v) for v, _, t, f in terms)
                o = o + sum(wv(cj[L.CM0 + i], mi[n]) for i, mi in enumerate(m))
                if last is not None:
                    o = o + wv(cj[L.CLAST], last[n])
                if kw.get("offset") is not None:
                    o = o + wv(cj[L.COFF], float(kw["offset"][n]))
                if delta is not None:
                    o = o + wv(cj[L.CDELTA], delta[k])
                if zn is not None:
                    o = o + wv(cj[L.CZ], zn)
                out[j, n] = np.nan if bad_k else o
    return [torch.from_numpy(o.reshape(shape)) for o in out]
