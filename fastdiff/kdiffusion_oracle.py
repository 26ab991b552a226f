"""k-diffusion's samplers (``k_diffusion.sampling``), the oracle of fastdiff's k-diffusion API, for tests
and benchmarks. The package's ``__init__`` pulls torchvision (whose PyPI wheel does not load beside a CPU
torch), yet ``sampling`` needs only ``utils.append_dims`` from the package: it is loaded from the installed
files under a bare package whose ``utils`` holds that one function (the same one line). Everything else it
runs is k-diffusion's own code. Install: ``pip install --no-deps k-diffusion torchsde torchdiffeq
trampoline`` (``make test`` does).
"""

from __future__ import annotations

import importlib.util
import sys
import types


def append_dims(x, target_dims):
    """k-diffusion's utils.append_dims: x with singleton dimensions appended up to target_dims."""
    dims_to_append = target_dims - x.ndim
    if dims_to_append < 0:
        raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
    return x[(...,) + (None,) * dims_to_append]


def sampling():
    """The module ``k_diffusion.sampling``; ImportError (saying why) when it cannot be loaded."""
    if "k_diffusion.sampling" in sys.modules:
        return sys.modules["k_diffusion.sampling"]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("k-diffusion is not installed (pip install --no-deps k-diffusion torchsde torchdiffeq "
                          "trampoline)")
    package = types.ModuleType("k_diffusion")
    package.__path__ = list(spec.submodule_search_locations)
    utils = types.ModuleType("k_diffusion.utils")
    utils.append_dims = append_dims
    package.utils = utils
    sys.modules.setdefault("k_diffusion", package)
    sys.modules.setdefault("k_diffusion.utils", utils)
    module_spec = importlib.util.spec_from_file_location("k_diffusion.sampling", f"{package.__path__[0]}/sampling.py")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)  # ImportError when torchsde / torchdiffeq are missing
    sys.modules["k_diffusion.sampling"] = module
    return module
