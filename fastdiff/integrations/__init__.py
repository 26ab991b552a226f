"""Drop-ins for existing code: diffusers schedulers (``fastdiff.integrations.diffusers``).

Each integration module imports its host library (diffusers, ...) itself, so ``import fastdiff`` does not.
"""
