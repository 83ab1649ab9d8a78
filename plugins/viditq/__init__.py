"""ViDiT-Q: timestep-aware W8A8 / W4A8 quantization of diffusion transformers (docs/methods/viditq.md)."""
