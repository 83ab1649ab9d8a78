"""EEP: gradient-free evolutionary expert pruning and merging for MoE models (kind ``expert_pruning``)."""
