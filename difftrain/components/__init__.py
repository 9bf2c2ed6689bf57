"""Training components: the diffusers training utilities, re-done and tested."""
