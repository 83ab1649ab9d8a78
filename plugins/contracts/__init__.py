"""Framework-neutral contracts, one per kind. Methods implement them; adapters consume them.

Only the contracts that methods already need are defined; the others arrive with their first method
(DESIGN.md: "define the kind contracts as the first methods need them").
"""
from .dit_cache import Attachment, DenoiserInfo, DiTCacheMethod
from .kv_cache import (KVBody, KVBudgetError, KVCacheMethod, LayerKVFormat, ModelIdentity, PagedBatch,
                       PagedGeometry, fold_qk_scale)
from .token_reduction import LayerwiseReducer, Selection, TokenReductionMethod, VideoGrid, VisionSpan
from .weight_quant import ParamSpec, WeightQuantMethod

__all__ = ["Attachment", "DenoiserInfo", "DiTCacheMethod", "KVBody", "KVBudgetError", "KVCacheMethod", "LayerKVFormat",
           "ModelIdentity", "PagedBatch", "PagedGeometry", "fold_qk_scale", "LayerwiseReducer", "ParamSpec", "Selection",
           "TokenReductionMethod", "VideoGrid", "VisionSpan", "WeightQuantMethod"]

from .dit_cache import (AttentionOp, CalibrationArtifact, CalibrationRun, DenoiserSession, DiTHooks,  # noqa: E402
                        ModuleCall, RecordedCall, StepContext)

__all__ += ["AttentionOp", "CalibrationArtifact", "CalibrationRun", "DenoiserSession", "DiTHooks", "ModuleCall",
            "RecordedCall", "StepContext"]
