"""The CUDA execution model on the host that runs csrc/cuda in CI (docs/architecture.md)."""
