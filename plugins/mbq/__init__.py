"""MBQ — modality-balanced quantization for vision-language models (``overdrive.mbq``).

Registered through the ``overdrive.plugins`` entry point ``mbq = overdrive.mbq.plugin``.
"""
