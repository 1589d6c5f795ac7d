"""flashdiff: fused kernels for diffusion models (placeholder while the op layer lands)."""
__version__ = "0.1.0"
