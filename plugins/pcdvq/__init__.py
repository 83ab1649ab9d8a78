"""PCDVQ — polar-coordinate decoupled vector quantization of LLM weights (``overdrive.pcdvq``).

Registered through the ``overdrive.plugins`` entry point ``pcdvq = overdrive.pcdvq.plugin``.
"""
