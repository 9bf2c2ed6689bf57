"""Model families: one file each (unet2d, sd15, sd3), what the latent text-to-image ones share (t2i, and
t2i_finished for reading their runs back), LoRA and pipeline loading; protocol.py says what a family provides."""
