// Empty: the emulation (cuda_runtime.h) keeps 16-bit floats as bits, as fastdiff/common.cuh does on the host.
#pragma once
