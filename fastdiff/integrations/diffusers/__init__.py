"""Drop-in diffusers schedulers: the same ``__init__`` arguments and defaults as the class they replace,
``from_config``/``save_pretrained``, the same outputs, and one fused kernel per ``step``::

    pipe.scheduler = FastDDIMScheduler.from_config(pipe.scheduler.config)

All of them stand on ``base.FastSchedulerMixin`` (noise, seeds, begin_index, plans, rows, add_noise).
"""

from fastdiff.integrations.diffusers.base import FastSchedulerMixin
from fastdiff.integrations.diffusers.ddim import FastDDIMScheduler
from fastdiff.integrations.diffusers.ddpm import FastDDPMScheduler
from fastdiff.integrations.diffusers.dpmsolver import FastDPMSolverMultistepScheduler
from fastdiff.integrations.diffusers.euler import FastEulerDiscreteScheduler
from fastdiff.integrations.diffusers.euler_ancestral import FastEulerAncestralDiscreteScheduler
from fastdiff.integrations.diffusers.flow import FastFlowMatchEulerDiscreteScheduler
from fastdiff.integrations.diffusers.heun import FastHeunDiscreteScheduler
from fastdiff.integrations.diffusers.lcm import FastLCMScheduler
from fastdiff.integrations.diffusers.unipc import FastUniPCMultistepScheduler

__all__ = [
    "FastDDIMScheduler", "FastDDPMScheduler", "FastDPMSolverMultistepScheduler", "FastEulerAncestralDiscreteScheduler",
    "FastEulerDiscreteScheduler", "FastFlowMatchEulerDiscreteScheduler", "FastHeunDiscreteScheduler",
    "FastLCMScheduler", "FastSchedulerMixin", "FastUniPCMultistepScheduler",
]
