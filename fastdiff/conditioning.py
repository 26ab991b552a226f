"""``fastdiff.conditioning``: GMM feature conditioning (Lu et al., "Diffusion Model Conditioning on Gaussian
Mixture Model and Negative Gaussian Mixture Gradient", Neurocomputing 614:128764, arXiv 2401.11261).

A condition is not one fixed embedding per class but a random vector: a draw from a Gaussian mixture fitted
to attribute/feature vectors (one mixture per label value, or one for all). The model is conditioned on

    c_n ~ p(c | y_n) = sum_k pi_{y,k} N(c; mu_{y,k}, diag(sigma_{y,k}^2))

and guidance can use ``grad_c log p(c | y) = sum_k r_k(c) (mu_{y,k} - c) / sigma_{y,k}^2``
(``GaussianMixture.score``).

What is not here: the paper's NGMG ("negative Gaussian mixture gradient") term. Its formula is not
available to us from any source we could reach, so fastdiff ships no guess under that name.

Per-sample seeds: ``sample(labels, seeds=s)`` draws example n from its label's mixture with Philox key
``s[n]`` (an int seed gives the keys ``philox.sample_seeds(s, B)``), so an example's vector depends only on
its key and its label - never on the batch it sits in.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fastdiff import philox
from fastdiff.gmm import GaussianMixture


def _check_labels(name: str, labels, known) -> torch.Tensor:
    """`labels` (a sequence of ints or a 1-D integer tensor) as a 1-D int64 CPU tensor of known values."""
    if isinstance(labels, torch.Tensor):
        t = labels.detach()
    else:
        try:
            t = torch.as_tensor(labels)
            t = t.to(torch.int64) if t.numel() == 0 else t  # [] is a float tensor to torch
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"{name}: expected a 1-D integer tensor or a sequence of ints, "
                            f"got {type(labels).__name__}") from err
    if t.dim() != 1 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name}: expected a 1-D integer tensor, got {t.dtype} of shape {tuple(t.shape)}")
    t = t.to(device="cpu", dtype=torch.int64)
    if known is not None:
        unknown = sorted(set(t.tolist()) - set(known))
        if unknown:
            raise ValueError(f"{name}: expected values among the fitted labels {sorted(known)}, "
                             f"got {unknown[:8]}")
    return t


class GMMConditioning:
    """Per-label Gaussian mixtures of conditioning vectors.

    ``GMMConditioning(mixtures)``: a ``GaussianMixture`` (unlabelled: one mixture for every example) or a
    mapping ``{label: GaussianMixture}`` (all of the same dimension). Usually built by ``fit``.
    """

    def __init__(self, mixtures: GaussianMixture | Mapping[int, GaussianMixture]):
        if isinstance(mixtures, GaussianMixture):
            self._mixtures, self.labelled = {None: mixtures}, False
        elif isinstance(mixtures, Mapping) and mixtures:
            bad = [key for key, m in mixtures.items()
                   if not isinstance(m, GaussianMixture) or isinstance(key, bool) or not isinstance(key, int)]
            if bad:
                raise TypeError(f"mixtures: expected int labels mapped to GaussianMixture, got entries {bad[:8]}")
            dims = {m.dim for m in mixtures.values()}
            if len(dims) != 1:
                raise ValueError(f"mixtures: expected one dimension for every label, got {sorted(dims)}")
            self._mixtures, self.labelled = {int(key): m for key, m in sorted(mixtures.items())}, True
        else:
            raise TypeError(f"mixtures: expected a GaussianMixture or a non-empty mapping label -> "
                            f"GaussianMixture, got {type(mixtures).__name__}")

    @classmethod
    def fit(cls, features, k: int, labels=None, *, seed: int = 0, **em) -> GMMConditioning:
        """Fit ``features [n, D]``: one K-component mixture per value of ``labels [n]`` (or one for all when
        None) with ``GaussianMixture.fit(..., k, seed=seed, **em)`` (``iters``, ``tol``, ``min_std``)."""
        if labels is None:
            return cls(GaussianMixture.fit(features, k, seed=seed, **em))
        if not isinstance(features, torch.Tensor):
            features = torch.as_tensor(features, dtype=torch.float64)
        lab = _check_labels("labels", labels, None)
        if features.dim() < 1 or lab.shape[0] != features.shape[0]:
            raise ValueError(f"labels: expected one label per feature row ({tuple(features.shape)[:1]}), "
                             f"got shape {tuple(lab.shape)}")
        values, counts = torch.unique(lab, return_counts=True)
        for value, count in zip(values.tolist(), counts.tolist()):  # all checked before any fit runs
            if isinstance(k, int) and count < k:
                raise ValueError(f"labels: label {value} has {count} feature rows, fewer than k = {k}")
        return cls({value: GaussianMixture.fit(features[(lab == value).to(features.device)], k, seed=seed, **em)
                    for value in values.tolist()})

    @property
    def labels(self) -> list[int] | None:
        """The fitted label values (sorted), or None for an unlabelled conditioning."""
        return list(self._mixtures) if self.labelled else None

    @property
    def dim(self) -> int:
        return next(iter(self._mixtures.values())).dim

    @property
    def _device(self) -> torch.device:
        return next(iter(self._mixtures.values())).device

    def mixture(self, label: int | None = None) -> GaussianMixture:
        """The mixture of `label` (None when unlabelled)."""
        if label not in self._mixtures:
            raise ValueError(f"label: expected one of {self.labels}, got {label!r}")
        return self._mixtures[label]

    def to(self, device) -> GMMConditioning:
        out = GMMConditioning.__new__(GMMConditioning)
        out._mixtures = {key: m.to(device) for key, m in self._mixtures.items()}
        out.labelled = self.labelled
        return out

    def __repr__(self) -> str:
        m = next(iter(self._mixtures.values()))
        what = f"labels={self.labels}" if self.labelled else "unlabelled"
        return f"GMMConditioning({what}, k={m.k}, dim={self.dim})"

    def _groups(self, labels, batch: int | None):
        """``[(label, row indices)]`` and the batch size: per label value in sorted order, or one group."""
        if not self.labelled:
            if labels is not None:
                raise ValueError("labels: this conditioning is unlabelled (fitted without labels), got labels")
            if batch is None:
                raise ValueError("n: expected the number of vectors for an unlabelled conditioning, got None")
            return [(None, None)], batch
        if labels is None:
            raise ValueError(f"labels: expected one label per example (fitted labels {self.labels}), got None")
        lab = _check_labels("labels", labels, self._mixtures)
        if batch is not None and batch != lab.shape[0]:
            raise ValueError(f"n: expected n = len(labels) = {lab.shape[0]} or None, got {batch}")
        return [(v, (lab == v).nonzero().flatten()) for v in self._mixtures if bool((lab == v).any())], lab.shape[0]

    def sample(self, labels=None, n: int | None = None, *, seeds=None, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float32, backend: str | None = None) -> torch.Tensor:
        """Per-example conditioning vectors ``[B, D]``: row n a draw from the mixture of ``labels[n]`` (the
        one mixture, B = n, when unlabelled). ``seeds``: an int or one key per example (the in-kernel
        draw; example n's vector depends only on its key and label); else `generator` (torch's default
        when None), consumed label by label in sorted label order."""
        if not self.labelled and isinstance(labels, int) and not isinstance(labels, bool) and n is None:
            labels, n = None, labels  # sample(8) on an unlabelled conditioning
        if seeds is not None and generator is not None:
            raise ValueError("seeds, generator: expected at most one of them, got both")
        groups, batch = self._groups(labels, n)
        keys = None if seeds is None else philox.seed_tensor(seeds, batch)
        out = None
        for value, rows in groups:
            m = self._mixtures[value]
            count = batch if rows is None else rows.shape[0]
            sub = None if keys is None else (keys if rows is None else keys[rows])
            draw = m.sample(count, generator=generator, seeds=sub, dtype=dtype, backend=backend)
            if rows is None:
                return draw
            if out is None:
                out = draw.new_empty(batch, self.dim)
            out[rows.to(out.device)] = draw
        return out if out is not None else torch.empty(0, self.dim, dtype=dtype, device=self._device)

    def _per_group(self, fn, c: torch.Tensor, labels, width: int | None):
        if not isinstance(c, torch.Tensor) or c.dim() != 2:
            raise ValueError(f"c: expected a tensor of shape [B, {self.dim}], got "
                             f"{tuple(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__}")
        groups, _ = self._groups(labels, c.shape[0])
        if not self.labelled:
            return fn(self._mixtures[None], c)
        out = None
        for value, rows in groups:
            r = rows.to(c.device)
            res = fn(self._mixtures[value], c[r])
            if out is None:
                out = res.new_empty((c.shape[0],) if width is None else (c.shape[0], width))
            out[r] = res
        if out is None:  # an empty batch
            return c.new_zeros((0,) if width is None else (0, width))
        return out

    def log_prob(self, c: torch.Tensor, labels=None) -> torch.Tensor:
        """``log p(c_n | labels[n])``: ``[B]``."""
        return self._per_group(lambda m, x: m.log_prob(x), c, labels, None)

    def score(self, c: torch.Tensor, labels=None, *, backend: str | None = None) -> torch.Tensor:
        """``grad_c log p(c_n | labels[n])``: ``[B, D]`` (for guidance on the conditioning vector)."""
        return self._per_group(lambda m, x: m.score(x, backend=backend), c, labels, self.dim)
