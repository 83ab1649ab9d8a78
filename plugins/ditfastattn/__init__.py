"""DiTFastAttn v1/v2: attention compression and caching for diffusion transformers (kind ``dit_caching``)."""
