"""``overdrive.transformers``: overdrive's methods in transformers. Importing it registers them.

    import overdrive.transformers
    model = AutoModelForCausalLM.from_pretrained("./model-q")  # a checkpoint from `overdrive quantize`

    overdrive.transformers.enable(vlm, "framefusion", cost=0.3)  # token reduction (hooks)
    overdrive.transformers.disable(vlm)
"""
from overdrive.adapters.transformers import OverdriveLinear, register
from overdrive.adapters.transformers_token_reduction import VLMS, disable, enable, enabled, register_vlm

__all__ = ["OverdriveLinear", "VLMS", "disable", "enable", "enabled", "register", "register_vlm"]

register()
