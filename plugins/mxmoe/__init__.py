"""MxMoE: mixed-precision quantization of MoE experts by sensitivity and expert activation frequency."""
