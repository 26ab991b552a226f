"""diffusers' noise, recorded or replaced: the stochastic drop-ins' tests run diffusers and fastdiff on the
same draws (and the float64 oracle on the fp32 run's draws)."""

import contextlib


@contextlib.contextmanager
def diffusers_noise(module, noises=None):
    """Inside, the draws of the diffusers scheduler module ``module`` (its ``randn_tensor``) are recorded
    into the yielded list, or, given ``noises``, replaced by them in order, in the dtype it asks for."""
    real, drawn = module.randn_tensor, []

    def draw(shape, generator=None, device=None, dtype=None, **kw):
        n = real(shape, generator=generator, device=device, dtype=dtype, **kw) if noises is None else \
            noises[len(drawn)].to(device=device, dtype=dtype)
        assert tuple(n.shape) == tuple(shape)
        drawn.append(n)
        return n

    module.randn_tensor = draw
    try:
        yield drawn
    finally:
        module.randn_tensor = real
