"""SGLang side of KV-cache methods (kind ``kv_cache_attention``): ``--attention-backend NAME``.

Registration (from :func:`overdrive.adapters.sglang.register`) puts a factory per method into SGLang's
attention-backend registry (``register_attention_backend``) and the name into the CLI choices
(``add_attention_backend_choices``). SGLang has no generic extra-config flag, so the plan comes from
``OVERDRIVE_<NAME>_PLAN``; the factory checks it against the model when the server builds its
attention backend. Nothing here knows a method: everything comes from the contract.

What the backend does in SGLang 0.5.23: SGLang's torch-native attention over SGLang's own KV pool,
with the method's semantics: the method's query/key transform (``transform_qk``), the step's tokens
attended at full precision, and tokens leaving the full-precision sink/window
(``LayerKVFormat.flush_range``) replaced in the pool by what the method would read back for them
(``KVCacheMethod.roundtrip``, e.g. their quantize-dequantize values at the layer's width). Layers with
per-head spans (``LayerKVFormat.head_spans``) write the step's K/V into the pool and run overdrive's span
attention over it instead (the pool read as one-token pages through ``req_to_token``): each query reads
only the sink and its KV head's window. **Memory is
not saved in SGLang**: the pool (``MHATokenToKVPool``, per-layer ``(tokens, heads, head_size)`` buffers
of the KV dtype) is sized and allocated by ``ModelRunner`` from ``--kv-cache-dtype`` (closed choices)
independently of the attention backend, and only a platform plugin (``get_kv_pool_cls``) can replace
it. The backend is for evaluating a plan's accuracy with SGLang's scheduler.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from overdrive.config import ConfigError
from overdrive.contracts.kv_cache import KVCacheMethod, LayerKVFormat, ModelIdentity
from overdrive.kernels.span_attention import span_paged_attention

from overdrive.adapters._kv_cache import kv_methods, load_active, paged_formats, plan_env


def backend_name(method: str) -> str:
    """SGLang ``--attention-backend`` value of a method (SGLang's names are lower-case)."""
    return method.lower()


def plan_path(method_name: str) -> str:
    """``OVERDRIVE_<METHOD>_PLAN``, or a ConfigError saying how to give it."""
    env = plan_env(method_name)
    path = os.environ.get(env)
    if not path:
        raise ConfigError(f"SGLang --attention-backend {backend_name(method_name)} needs a plan: set {env}=PLAN.json "
                          f"(see `overdrive list` for how method {method_name!r} makes one)")
    return path


def load_formats(method_name: str, hf_config: Any, tp_rank: int = 0, tp_size: int = 1
                 ) -> tuple[KVCacheMethod, list[LayerKVFormat]]:
    """(method impl, per-layer formats) for the model, from ``OVERDRIVE_<METHOD>_PLAN``; ConfigError when absent/wrong."""
    path = plan_path(method_name)
    active = load_active(method_name, path, plan_env(method_name))
    fmts = list(paged_formats(active, ModelIdentity.from_hf_config(hf_config), tp_rank, tp_size))
    return active.method, fmts


def make_backend_class():
    """SGLang backend class (built on first use: imports SGLang)."""
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    class OverdriveKVSGLangBackend(TorchNativeAttnBackend):
        def __init__(self, model_runner, method: KVCacheMethod, formats: list[LayerKVFormat]) -> None:
            super().__init__(model_runner)
            self.method, self.formats = method, formats

        def _qk(self, layer, q, k):
            if k is None:
                return q, k
            q3 = q.view(-1, layer.tp_q_head_num, layer.qk_head_dim)
            k3 = k.view(-1, layer.tp_k_head_num, layer.qk_head_dim)
            q3, k3 = self.method.transform_qk(self.formats[layer.layer_id], q3, k3)
            return q3.reshape(q.shape), k3.reshape(k.shape)

        def _flush(self, layer, forward_batch, new_lens: list[int]) -> None:
            fmt = self.formats[layer.layer_id]
            if fmt.dense:
                return
            pool = self.token_to_kv_pool
            kbuf, vbuf = pool.get_key_buffer(layer.layer_id), pool.get_value_buffer(layer.layer_id)
            seq = forward_batch.seq_lens.tolist()
            rows = forward_batch.req_pool_indices.tolist()
            for r, total in enumerate(seq):
                pos = fmt.flush_range(total - new_lens[r], total)
                if not len(pos):
                    continue
                slots = self.req_to_token_pool.req_to_token[rows[r], pos.start:pos.stop].to(torch.long)
                # the contract's layout: (batch, KV heads, tokens, head size)
                k, v = (buf[slots].transpose(0, 1)[None] for buf in (kbuf, vbuf))
                k, v = self.method.roundtrip(fmt, k, v)
                kbuf[slots] = k[0].transpose(0, 1).to(kbuf.dtype)
                vbuf[slots] = v[0].transpose(0, 1).to(vbuf.dtype)

        def _spans(self, q, k, v, layer, forward_batch, new_lens: list[int], save_kv_cache: bool):
            """Per-head span attention over SGLang's pool, read as pages of one token (block table = the
            requests' ``req_to_token`` rows): the step's K/V are written first, then every query reads only
            the sink and its head's window (``overdrive.kernels.span_paged_attention``)."""
            fmt = self.formats[layer.layer_id]
            hq, hk, d = layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim
            pool = self.token_to_kv_pool
            kbuf, vbuf = pool.get_key_buffer(layer.layer_id), pool.get_value_buffer(layer.layer_id)
            if save_kv_cache and k is not None:  # an unquantized MHA pool: what set_kv_buffer writes
                loc = forward_batch.out_cache_loc.to(torch.long)
                kbuf[loc] = k.view(-1, hk, d).to(kbuf.dtype)
                vbuf[loc] = v.view(-1, hk, d).to(vbuf.dtype)
            dev = q.device
            lens = torch.tensor(new_lens, device=dev)
            rows = torch.repeat_interleave(torch.arange(len(new_lens), device=dev), lens)
            first = torch.cumsum(lens, 0) - lens
            pos = (forward_batch.seq_lens.to(dev) - lens)[rows] + torch.arange(rows.numel(), device=dev) - first[rows]
            table = self.req_to_token_pool.req_to_token[forward_batch.req_pool_indices.to(torch.long)]
            out = span_paged_attention(q.reshape(-1, hq, d), kbuf[:, :, None], vbuf[:, :, None], table, rows, pos,
                                       fmt.span_starts(pos + 1), fmt.sink, layer.scaling)
            return out.reshape(q.shape[0], hq * d)

        def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True):
            q, k = self._qk(layer, q, k)
            if self.formats[layer.layer_id].head_spans is not None:
                return self._spans(q, k, v, layer, forward_batch, forward_batch.extend_seq_lens.tolist(), save_kv_cache)
            o = super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache)
            if save_kv_cache:
                self._flush(layer, forward_batch, forward_batch.extend_seq_lens.tolist())
            return o

        def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True):
            q, k = self._qk(layer, q, k)
            if self.formats[layer.layer_id].head_spans is not None:
                return self._spans(q, k, v, layer, forward_batch, [1] * forward_batch.batch_size, save_kv_cache)
            o = super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache)
            if save_kv_cache:
                self._flush(layer, forward_batch, [1] * forward_batch.batch_size)
            return o

    return OverdriveKVSGLangBackend


def register_backends() -> tuple[list[str], list[str]]:
    """Put a factory per KV-cache method into SGLang's attention registry and CLI choices."""
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS, register_attention_backend

    from overdrive.adapters._register import keep_intree

    registered, skipped = [], []
    for spec in kv_methods():
        name = backend_name(spec.name)
        existing = ATTENTION_BACKENDS.get(name)
        reason = keep_intree("sglang", name, existing is not None and getattr(existing, "overdrive_method", None) != spec.name)
        if reason:
            skipped.append(reason)
            continue

        def factory(runner, _method=spec.name):
            plan_path(_method)  # fail first, with the flag to set, when no plan is given
            from sglang.srt.distributed.parallel_state import (get_tensor_model_parallel_rank,
                                                              get_tensor_model_parallel_world_size, model_parallel_is_initialized)

            rank, size = ((get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size())
                          if model_parallel_is_initialized() else (0, 1))
            method, formats = load_formats(_method, runner.model_config.hf_config, rank, size)
            return make_backend_class()(runner, method, formats)

        factory.overdrive_method = spec.name
        register_attention_backend(name)(factory)
        if name not in ATTENTION_BACKEND_CHOICES:
            add_attention_backend_choices([name])
        registered.append(spec.name)
    return registered, skipped
