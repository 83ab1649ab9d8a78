"""``overdrive.transformers``: overdrive's methods in transformers. Importing it registers them.

    import overdrive.transformers
    model = AutoModelForCausalLM.from_pretrained("./model-q")  # a checkpoint from `overdrive quantize`

    overdrive.transformers.enable(vlm, "framefusion", cost=0.3)  # token reduction (hooks)
    overdrive.transformers.disable(vlm)
    overdrive.transformers.enable(llm, "vocabtailor", profile="profile.json")  # vocabulary selection

    cache = overdrive.transformers.kv_cache(llm, "pmkvq", plan="plan.json")  # KV-cache method: a Cache
    llm.generate(ids, past_key_values=cache)

    out = overdrive.transformers.routed_generate(small, large, "r2r", router="./router", input_ids=ids)  # routing

    overdrive.transformers.enable(moe, "eep", plan="eep.json")  # expert pruning (router + experts swapped)
"""
from overdrive.adapters.transformers import OverdriveLinear, disable, enable, enabled, register
from overdrive.adapters.transformers.kv_cache import kv_cache
from overdrive.adapters.transformers.routing import RoutedOutput, routed_generate
from overdrive.adapters.transformers.expert_pruning import calibrate_command as expert_pruning_command
from overdrive.adapters.transformers.token_reduction import VLMS, register_vlm

__all__ = ["OverdriveLinear", "RoutedOutput", "VLMS", "disable", "enable", "enabled", "expert_pruning_command",
           "kv_cache", "register", "register_vlm", "routed_generate"]

register()
