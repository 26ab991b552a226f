// FD_CLONES: a hot CPU loop compiled for baseline x86-64, x86-64-v3 (AVX2) and x86-64-v4 (AVX-512), the
// version picked at run time (GCC target_clones), as numpy does: portable wheels, no -march=native.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#define FD_CLONES __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define FD_CLONES
#endif
