"""transformers adapter (explicit API; transformers has no plugin entry points).

No kind is served through transformers yet: the first methods that need it bring their helpers here
(weight quantization through ``transformers.quantizers.register_quantizer``; KV-cache methods as a
``Cache`` passed as ``past_key_values``; see shared/research/frameworks.md §4). ``overdrive list``
shows this as an empty column until then.
"""
from __future__ import annotations
