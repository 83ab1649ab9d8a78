"""Framework-neutral contracts, one per kind. Methods implement them; adapters consume them.

Only the contracts that methods already need are defined; the others arrive with their first method
(DESIGN.md: "define the kind contracts as the first methods need them").
"""
from .dit_cache import Attachment, DenoiserInfo, DiTCacheMethod
from .kv_cache import KVCacheMethod, LayerKVFormat, ModelIdentity, PagedBatch
from .token_reduction import LayerwiseReducer, Selection, TokenReductionMethod, VideoGrid, VisionSpan
from .token_routing import (RoutedSequence, Router, RouterInputs, TokenRoutingMethod, check_shared_tokenizer, route_mask,
                            threshold_logit)
from .weight_quant import ParamSpec, WeightQuantMethod

__all__ = ["Attachment", "DenoiserInfo", "DiTCacheMethod", "KVCacheMethod", "LayerKVFormat", "ModelIdentity",
           "PagedBatch", "LayerwiseReducer", "ParamSpec", "RoutedSequence", "Router", "RouterInputs", "Selection",
           "TokenReductionMethod", "TokenRoutingMethod", "VideoGrid", "VisionSpan", "WeightQuantMethod",
           "check_shared_tokenizer", "route_mask", "threshold_logit"]
