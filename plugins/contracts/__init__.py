"""Framework-neutral contracts, one per kind. Methods implement them; adapters consume them.

Only the contracts that methods already need are defined; the others arrive with their first method
(kind contracts are defined as the first methods need them).
"""
from .dit_cache import (Attachment, AttentionOp, CalibrationArtifact, CalibrationRun, DenoiserInfo, DenoiserSession,
                        DiTCacheMethod, DiTHooks, ModuleCall, RecordedCall, RotaryInfo, StepContext)
from .frame_rate import CompactionPlan, FrameRateMethod, FrameRateSchedule, Interpolator, VideoCodec
from .kv_cache import (HeadSpans, KVBody, KVBudgetError, KVCacheMethod, LayerKVFormat, ModelIdentity, PagedBatch,
                       PagedGeometry, fold_qk_scale)
from .token_reduction import LayerwiseReducer, Selection, TokenReductionMethod, VideoGrid, VisionSpan
from .token_routing import (RoutedSequence, Router, RouterInputs, TokenRoutingMethod, check_shared_tokenizer, route_mask,
                            threshold_logit)
from .vocab import BatchVocab, VocabIdentity, VocabSelectionMethod, tokenizer_hash
from .weight_quant import ParamSpec, StandardWeight, WeightFormat, WeightQuantMethod

__all__ = ["Attachment", "AttentionOp", "BatchVocab", "CalibrationArtifact", "CalibrationRun", "CompactionPlan", "DenoiserInfo",
           "DenoiserSession", "DiTCacheMethod", "DiTHooks", "FrameRateMethod", "FrameRateSchedule", "HeadSpans", "Interpolator", "KVBody", "KVBudgetError", "KVCacheMethod", "LayerKVFormat", "LayerwiseReducer",
           "ModelIdentity", "ModuleCall", "PagedBatch", "PagedGeometry", "ParamSpec", "RecordedCall", "RotaryInfo", "RoutedSequence",
           "Router", "RouterInputs", "Selection", "StepContext", "TokenReductionMethod", "TokenRoutingMethod",
           "StandardWeight", "VideoCodec", "VideoGrid", "VisionSpan", "VocabIdentity", "VocabSelectionMethod", "WeightFormat",
           "WeightQuantMethod", "check_shared_tokenizer", "fold_qk_scale", "route_mask", "threshold_logit", "tokenizer_hash"]
