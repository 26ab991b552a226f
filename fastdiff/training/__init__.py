"""Training-time helpers of the seed methods: each method's forward noising (a fused plan or op) and its
loss, one module per method: ``mixddpm`` (mixture noise with the global offset), ``ddm`` (decoupled diffusion),
``iadb`` (alpha blending)."""
