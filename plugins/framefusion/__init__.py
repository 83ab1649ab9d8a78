"""FrameFusion: video token merging and pruning for vision-language models (kind ``token_reduction``)."""
