"""VGDFR (training-free dynamic latent frame rate for video diffusion) and DLFR-VAE-style variable-frame-rate encode/decode."""
