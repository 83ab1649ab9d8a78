"""VocabTailor: embedding offload and a per-request vocabulary for the LM head (kind ``vocabulary_selection``)."""
