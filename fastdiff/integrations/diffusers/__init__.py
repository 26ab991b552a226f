"""Drop-in diffusers schedulers: the same ``__init__`` arguments and defaults as the class they replace,
``from_config``/``save_pretrained``, the same outputs, and one fused kernel per ``step``::

    pipe.scheduler = FastDDIMScheduler.from_config(pipe.scheduler.config)

All of them stand on ``base.FastSchedulerMixin`` (noise, seeds, begin_index, plans, rows, add_noise).

The seed methods' schedulers, in the same style (``from_config``, ``save_pretrained``, ``set_timesteps``,
``step``, ``add_noise``): ``MixDDPMScheduler`` and ``MixDDIMScheduler`` (Mix-DDPM), ``DDIMGMMScheduler``
(DDIM-GMM), ``DDMScheduler`` (decoupled diffusion), ``IADBScheduler`` (alpha-(de)blending).
"""

from fastdiff.integrations.diffusers.base import FastSchedulerMixin
from fastdiff.integrations.diffusers.ddim import FastDDIMScheduler
from fastdiff.integrations.diffusers.ddim_gmm import DDIMGMMScheduler
from fastdiff.integrations.diffusers.ddm import DDMScheduler
from fastdiff.integrations.diffusers.ddpm import FastDDPMScheduler
from fastdiff.integrations.diffusers.dpmsolver import FastDPMSolverMultistepScheduler
from fastdiff.integrations.diffusers.euler import FastEulerDiscreteScheduler
from fastdiff.integrations.diffusers.euler_ancestral import FastEulerAncestralDiscreteScheduler
from fastdiff.integrations.diffusers.flow import FastFlowMatchEulerDiscreteScheduler
from fastdiff.integrations.diffusers.heun import FastHeunDiscreteScheduler
from fastdiff.integrations.diffusers.iadb import IADBScheduler
from fastdiff.integrations.diffusers.lcm import FastLCMScheduler
from fastdiff.integrations.diffusers.mixddpm import MixDDIMScheduler, MixDDPMScheduler
from fastdiff.integrations.diffusers.unipc import FastUniPCMultistepScheduler

__all__ = [
    "DDIMGMMScheduler", "DDMScheduler", "IADBScheduler", "MixDDIMScheduler", "MixDDPMScheduler",
    "FastDDIMScheduler", "FastDDPMScheduler", "FastDPMSolverMultistepScheduler", "FastEulerAncestralDiscreteScheduler",
    "FastEulerDiscreteScheduler", "FastFlowMatchEulerDiscreteScheduler", "FastHeunDiscreteScheduler",
    "FastLCMScheduler", "FastSchedulerMixin", "FastUniPCMultistepScheduler",
]
