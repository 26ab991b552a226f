"""fastdiff.conditioning.GMMConditioning: per-label mixtures fitted to features drawn here from known
mixtures; per-label draws land on that label's components (and follow the Philox contract written out
here); seeds reproduce an example's vector whatever its batch; log_prob is the closed form of the label's
mixture and score its finite-difference gradient; bad input is refused naming the argument."""

import math

import pytest
import torch
from conftest import assert_close
from test_gmm import closed_form_log_prob, draw_mixture, finite_difference_score

from fastdiff import philox
from fastdiff.conditioning import GMMConditioning
from fastdiff.gmm import GaussianMixture

# Two labels, two well-separated components each (float32-exact parameters).
TRUTH = {
    3: ([0.4, 0.6], [[-10.0, 0.0], [-10.0, 8.0]], [[1.0, 1.0], [0.5, 1.5]]),
    7: ([0.7, 0.3], [[10.0, 0.0], [10.0, -8.0]], [[0.75, 0.75], [1.0, 0.5]]),
}


@pytest.fixture(scope="module")
def data():
    feats, labels = [], []
    for seed, (label, (w, mu, sd)) in enumerate(TRUTH.items()):
        x, _ = draw_mixture(w, mu, sd, 3000, seed=20 + seed)
        feats.append(x)
        labels.append(torch.full((3000,), label))
    perm = torch.randperm(6000, generator=torch.Generator().manual_seed(1))
    return torch.cat(feats)[perm], torch.cat(labels)[perm]


@pytest.fixture(scope="module")
def cond(data):
    return GMMConditioning.fit(data[0], 2, labels=data[1], seed=0)


def test_each_label_gets_its_own_fitted_mixture(cond):
    assert cond.labels == [3, 7] and cond.dim == 2 and "labels=[3, 7]" in repr(cond)
    for label, (w, mu, sd) in TRUTH.items():
        m = cond.mixture(label)
        order = (m.means[:, 1] * (1 if label == 3 else -1)).argsort()  # the true means' order
        # 3000 points per label: weight s.e. <= 0.01, mean s.e. <= 0.04, std s.e. <= 2 %
        assert_close(m.weights[order], torch.tensor(w), atol=0.04, rtol=0, what=f"weights {label}")
        assert_close(m.means[order], torch.tensor(mu), atol=0.15, rtol=0, what=f"means {label}")
        assert_close(m.stds[order], torch.tensor(sd), atol=0, rtol=0.08, what=f"stds {label}")


def test_per_label_draws_come_from_that_labels_mixture(cond):
    labels = torch.tensor([3, 7] * 2000)
    c = cond.sample(labels, seeds=4)
    assert c.shape == (4000, 2) and c.dtype == torch.float32
    all_means = torch.tensor([mu for _, mu, _ in TRUTH.values()]).reshape(4, 2)
    owner = torch.tensor([3, 3, 7, 7])[torch.cdist(c, all_means).argmin(1)]
    assert torch.equal(owner, labels)  # components are >= 8 stds apart: each draw sits at its own label's
    for label, (w, mu, sd) in TRUTH.items():
        rows = c[labels == label].double()
        w, mu, sd = torch.tensor(w).double(), torch.tensor(mu).double(), torch.tensor(sd).double()
        mean = (w[:, None] * mu).sum(0)
        std = ((w[:, None] * (sd**2 + mu**2)).sum(0) - mean**2).sqrt()
        # 5 standard errors of the mean of 2000 draws, plus the fit's error on the means (< 0.15)
        assert bool(((rows.mean(0) - mean).abs() < 5 * std / math.sqrt(2000) + 0.15).all()), (label, rows.mean(0))


def test_seeded_draws_are_the_philox_contract_of_the_labels_mixture(cond):
    labels = torch.tensor([7, 3, 3, 7, 3])
    keys = philox.sample_seeds(11, 5)
    c = cond.sample(labels, seeds=keys)
    for n, label in enumerate(labels.tolist()):
        m = cond.mixture(label)
        u = philox.uniform(keys[n:n + 1], 1, domain=philox.DOMAIN_CATEGORICAL)[:, 0]
        k = int(philox.categorical(u, m.weights.double()))
        z = philox.randn(keys[n:n + 1], 2, domain=philox.DOMAIN_TRAIN, dtype=torch.float64)[0]
        assert_close(c[n], m.means[k].double() + m.stds[k].double() * z, atol=1e-5, rtol=1e-5, what=f"row {n}")


def test_seeds_reproduce_each_example_whatever_the_batch(cond):
    labels = [3, 7, 7, 3, 7, 3]
    big = cond.sample(labels, seeds=5)
    assert torch.equal(cond.sample(labels[:2], seeds=5), big[:2])
    keys = philox.sample_seeds(5, 6)
    assert torch.equal(cond.sample([7], seeds=keys[4:5]), big[4:5])
    assert torch.equal(cond.sample([3, 7], seeds=keys[[5, 2]]), big[[5, 2]])


def test_generator_draws_are_reproducible(cond):
    labels = [7, 3, 3]
    a = cond.sample(labels, generator=torch.Generator().manual_seed(2))
    b = cond.sample(labels, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, cond.sample(labels, generator=torch.Generator().manual_seed(3)))


def test_log_prob_and_score_are_the_labels_mixture(cond):
    labels = torch.tensor([3, 7, 7, 3, 7])
    c = torch.randn(5, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64) * 4
    c[:, 0] += torch.where(labels == 3, -10.0, 10.0).double()
    expected = torch.cat([closed_form_log_prob(c[n:n + 1], *(t.tolist() for t in (
        cond.mixture(int(label))._weights64, cond.mixture(int(label))._means64, cond.mixture(int(label))._stds64)))
        for n, label in enumerate(labels)])
    assert_close(cond.log_prob(c, labels), expected, atol=1e-10, rtol=1e-12, what="log_prob")
    fd = torch.cat([finite_difference_score(cond.mixture(int(label)), c[n:n + 1]) for n, label in enumerate(labels)])
    assert_close(cond.score(c, labels), fd, atol=1e-6, rtol=1e-6, what="score vs FD")


def test_unlabelled_conditioning_is_one_mixture():
    x, _ = draw_mixture(*TRUTH[3], 2000, seed=30)
    cond = GMMConditioning.fit(x, 2, seed=1)
    assert cond.labels is None and "unlabelled" in repr(cond)
    c = cond.sample(6, seeds=3)
    assert c.shape == (6, 2) and torch.equal(cond.sample(n=2, seeds=3), c[:2])
    assert_close(cond.log_prob(c.double()), cond.mixture().log_prob(c.double()), atol=0, rtol=0, what="log_prob")
    wrapped = GMMConditioning({0: cond.mixture(), 1: GaussianMixture([1.0], [[0.0, 0.0]], [[1.0, 1.0]])})
    assert wrapped.labels == [0, 1] and wrapped.sample([1, 0], seeds=1).shape == (2, 2)


def test_bad_input_is_refused_naming_the_argument(cond, data):
    with pytest.raises(ValueError, match=r"labels: expected values among the fitted labels \[3, 7\], got \[5\]"):
        cond.sample([3, 5])
    with pytest.raises(ValueError, match=r"labels: expected one label per example"):
        cond.sample(n=4)
    with pytest.raises(TypeError, match=r"labels: expected a 1-D integer tensor"):
        cond.sample(torch.tensor([3.0, 7.0]))
    with pytest.raises(ValueError, match=r"c: expected a tensor of shape \[B, 2\]"):
        cond.score(torch.zeros(3), [3, 3, 3])
    x, labels = data
    with pytest.raises(ValueError, match=r"labels: expected one label per feature row"):
        GMMConditioning.fit(x, 2, labels=labels[:-1])
    few = labels.clone()
    few[:3] = 9
    with pytest.raises(ValueError, match=r"labels: label 9 has 3 feature rows, fewer than k = 4"):
        GMMConditioning.fit(x, 4, labels=few)
    with pytest.raises(TypeError, match=r"mixtures: expected a GaussianMixture or a non-empty mapping"):
        GMMConditioning({})
    with pytest.raises(ValueError, match=r"mixtures: expected one dimension for every label"):
        GMMConditioning({0: GaussianMixture([1.0], [[0.0]], [[1.0]]), 1: GaussianMixture([1.0], [[0.0, 0.0]],
                                                                                          [[1.0, 1.0]])})
