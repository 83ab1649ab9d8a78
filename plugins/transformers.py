"""``overdrive.transformers``: overdrive's methods in transformers. Importing it registers them.

    import overdrive.transformers
    model = AutoModelForCausalLM.from_pretrained("./model-q")  # a checkpoint from `overdrive quantize`
"""
from overdrive.adapters.transformers import OverdriveLinear, register

__all__ = ["OverdriveLinear", "register"]

register()
