"""Latent text-to-image model families (SD 1.x/2.x, SD3) on the engine's ModelBundle seam."""
