"""vLLM v1 attention backend for ``--kv-cache-dtype turboquant``: Backend / MetadataBuilder / Impl.

The paged cache of a layer is ``uint8 [num_blocks, block_size, num_kv_heads, slot_bytes]``: one packed slot per
token per KV head holding K and V codes and norms (layout: ``vllm_gds_plugin.kvcache.presets``). vLLM writes new
tokens through :meth:`TurboQuantImpl.do_kv_cache_update` (``ops.store``) and then calls
:meth:`TurboQuantImpl.forward`, which attends over the compressed cache only (decode, prefill, chunked-prefill
continuations and prefix-cache hits alike, since the new tokens are already in the cache). Both ops run Triton
kernels on CUDA and the torch reference on CPU. On CUDA builds that ship FlashAttention the batch's multi-token
queries (ordered after its decodes) attend through ``dense_prefill`` (unless ``VLLM_GDS_TQ_PREFILL=triton``,
compat/flash_attention.py): their cache ranges dequantized into a bounded workspace, FlashAttention over that; the
plan for it is made once per batch in the metadata builder.

vLLM selects this backend through ``vllm_gds_plugin.compat.attention`` whenever the KV cache dtype is
``turboquant``; this module imports vLLM only through ``vllm_gds_plugin.compat.attention_api``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from vllm_gds_plugin.compat.attention_api import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadata,
    AttentionMetadataBuilder,
    AttentionSpec,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
    extract_layer_index,
    get_current_vllm_config,
    packed_spec,
    paged_cache_view,
    preferred_layouts,
)
from vllm_gds_plugin.compat.flash_attention import prefill_attention
from vllm_gds_plugin.compat.kv_dtype import TQ_KV_CACHE_DTYPE, is_turboquant
from vllm_gds_plugin.compat.parallel import rank_kv_heads, served_model
from vllm_gds_plugin.kvcache.calibration_lookup import model_calibration
from vllm_gds_plugin.kvcache.presets import SUPPORTED_HEAD_DIMS, TurboQuantConfigError
from vllm_gds_plugin.kvcache.selection import TurboQuantSelection, select

# Dequantized K and V of one prefill launch (dense_prefill): 256 MiB is 64K positions of Llama-3.1-8B's 8 KV
# heads. Allocated per call, like every activation of the forward, not reserved.
PREFILL_WORKSPACE_BYTES = 256 << 20

# The registry name vLLM knows this backend by (``AttentionBackendEnum.CUSTOM``, registered in compat).
BACKEND_NAME = "CUSTOM"

# The selection of the engine whose model was built last in this process. The spec/shape hooks vLLM calls
# (customize_spec, get_kv_cache_shape) get no config, but always run after the model (hence every Impl) was
# built for that engine, so this is the preset those layers store with.
_engine_selection: TurboQuantSelection | None = None


def engine_selection() -> TurboQuantSelection:
    if _engine_selection is None:
        raise TurboQuantConfigError("TurboQuant KV cache sized before any attention layer was built")
    return _engine_selection


class TurboQuantBackend(AttentionBackend):
    accept_output_buffer: bool = True
    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16]
    supported_kv_cache_dtypes: ClassVar[list[Any]] = [TQ_KV_CACHE_DTYPE]

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type[TurboQuantImpl]:
        return TurboQuantImpl

    @staticmethod
    def get_builder_cls() -> type[TurboQuantMetadataBuilder]:
        return TurboQuantMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec: Any = None) -> list[int | MultipleOf]:
        return [MultipleOf(16)]

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return list(SUPPORTED_HEAD_DIMS)

    @classmethod
    def supports_kv_cache_dtype(cls, kv_cache_dtype: Any) -> bool:
        return is_turboquant(kv_cache_dtype)

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        """Size pages from the packed slot (vLLM 0.32 calls this; compat calls it on 0.26)."""
        return packed_spec(spec, engine_selection().preset.slot_bytes(spec.head_size))

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple | None:
        return preferred_layouts()

    @staticmethod
    def get_kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int,
                           cache_dtype_str: str = TQ_KV_CACHE_DTYPE) -> tuple[int, ...]:
        """Per-layer cache shape on vLLM 0.26 (0.32 derives it from the spec)."""
        return (num_blocks, block_size, num_kv_heads, engine_selection().preset.slot_bytes(head_size))


@dataclass
class TurboQuantMetadata(AttentionMetadata):
    # Device tensors owned by the model runner's persistent buffers (stable addresses for CUDA graphs).
    seq_lens: torch.Tensor  # int32 [num_reqs]
    block_table: torch.Tensor  # int32 [num_reqs, max_blocks]
    query_start_loc: torch.Tensor  # int32 [num_reqs + 1]
    num_actual_tokens: int
    # Set when multi-token queries attend through FlashAttention: the requests before them are single-token
    # decodes (vLLM orders them first), their tokens the first num_decodes.
    prefill: Any = None  # dense_prefill.PrefillPlan
    prefill_attention: Any = None  # dense_prefill.VarlenAttention, resolved once by the builder
    num_decodes: int = 0


class TurboQuantMetadataBuilder(AttentionMetadataBuilder[TurboQuantMetadata]):
    # Full CUDA graphs for pure decode batches; mixed prefill/decode batches run attention eagerly
    # (piecewise graphs around it).
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE

    def __init__(self, kv_cache_spec: Any, layer_names: list[str], vllm_config: Any, device: torch.device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.prefill_attention = prefill_attention(device.type, kv_cache_spec.head_size)
        if self.prefill_attention is not None:
            self.reorder_batch_threshold = 1  # decodes first, then the multi-token queries

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> TurboQuantMetadata:
        cam = common_attn_metadata
        md = TurboQuantMetadata(seq_lens=cam.seq_lens, block_table=cam.block_table_tensor,
                                query_start_loc=cam.query_start_loc, num_actual_tokens=cam.num_actual_tokens)
        if self.prefill_attention is not None and cam.max_query_len > 1:
            self._plan_prefill(cam, md)
        return md

    def _plan_prefill(self, cam: CommonAttentionMetadata, md: TurboQuantMetadata) -> None:
        from vllm_gds_plugin.kernels.turboquant import dense_prefill

        query_lens = cam.query_start_loc_cpu[:cam.num_reqs + 1].diff().tolist()
        decodes = next((i for i, n in enumerate(query_lens) if n != 1), len(query_lens))
        if any(n <= 1 for n in query_lens[decodes:]):
            return  # not ordered decodes-first: the Triton kernel takes the whole batch
        # The upper bound is exact for prefill rows (and is on the CPU already).
        seq_lens = cam.seq_lens_cpu_upper_bound
        seq_lens = (cam.seq_lens.cpu() if seq_lens is None else seq_lens)[decodes:cam.num_reqs].tolist()
        spec = self.kv_cache_spec
        tokens = dense_prefill.workspace_tokens_for(PREFILL_WORKSPACE_BYTES, spec.num_kv_heads, spec.head_size,
                                                    cam.max_query_len)
        md.prefill = dense_prefill.plan(query_lens[decodes:], seq_lens, tokens, self.device)
        md.prefill_attention = self.prefill_attention
        md.num_decodes = decodes


class TurboQuantImpl(AttentionImpl[TurboQuantMetadata]):
    supports_quant_query_input: bool = False

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None,
                 alibi_slopes: list[float] | None = None, sliding_window: int | None = None,
                 kv_cache_dtype: str = TQ_KV_CACHE_DTYPE, logits_soft_cap: float | None = None,
                 attn_type: str = AttentionType.DECODER, kv_sharing_target_layer_name: str | None = None,
                 **extra: Any) -> None:
        # Selection already refused these configurations with a clear message; these guard direct use.
        unsupported = {"ALiBi": alibi_slopes is not None, "sliding window": sliding_window is not None,
                       "logits soft cap": bool(logits_soft_cap), "attention sinks": extra.get("sinks") is not None,
                       f"attention type {attn_type}": attn_type != AttentionType.DECODER}
        refused = [name for name, present in unsupported.items() if present]
        if refused:
            raise TurboQuantConfigError(f"--kv-cache-dtype turboquant does not support {', '.join(refused)}")
        from vllm_gds_plugin.kernels.turboquant import ops  # Triton is imported here, in the worker only

        global _engine_selection
        vllm_config = get_current_vllm_config()
        _engine_selection = select(vllm_config.additional_config)
        self.selection = _engine_selection
        self.ops = ops
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        # A layer reading another layer's cache must decode with that layer's rotation.
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        self.state: Any = None
        self.selection.preset.slot_bytes(head_size)  # unsupported head_dim fails at engine start
        # Key centering measured offline for this model (calibration_lookup.py): read and checked against the
        # model here, so a missing or mismatched file shows at engine start; this rank keeps its own KV heads.
        served = served_model(vllm_config)
        self.calibration = model_calibration(self.selection.calibration, served.model, served.num_layers,
                                             served.total_kv_heads, served.head_dim)
        self.kv_heads = rank_kv_heads(served.total_kv_heads)

    def _state(self, layer: Any, device: torch.device) -> Any:
        """The layer's rotation, codebooks and calibration, built on first use (the profiling run, before graph
        capture)."""
        if self.state is None:
            from vllm_gds_plugin.kvcache.quantizer import TurboQuantState

            owner = extract_layer_index(self.kv_sharing_target_layer_name or layer.layer_name)
            cal = None if self.calibration is None else self.calibration.layer(owner, self.kv_heads)
            self.state = TurboQuantState.build(self.selection.preset, self.head_size, owner,
                                               seed=self.selection.seed, device=device,
                                               num_kv_heads=self.num_kv_heads, calibration=cal)
        return self.state

    def do_kv_cache_update(self, layer: Any, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                           slot_mapping: torch.Tensor) -> None:
        n = slot_mapping.shape[0]  # key/value may carry CUDA-graph padding past the mapped tokens
        self.ops.store(key[:n], value[:n], paged_cache_view(kv_cache), slot_mapping,
                       self._state(layer, key.device))

    def forward(self, layer: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: TurboQuantMetadata | None, output: torch.Tensor | None = None,
                output_scale: torch.Tensor | None = None,
                output_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise TurboQuantConfigError("--kv-cache-dtype turboquant does not support fused output quantization")
        assert output is not None, "TurboQuantBackend.accept_output_buffer: vLLM passes the output buffer"
        state = self._state(layer, query.device)
        if attn_metadata is None:  # profiling run: no cache, shapes only
            return output.zero_()
        md = attn_metadata
        n = md.num_actual_tokens
        cache = paged_cache_view(kv_cache)
        if md.prefill is None:
            self.ops.attention(query[:n], cache, md.block_table, md.seq_lens, md.query_start_loc, self.scale,
                               state, out=output[:n])
            return output
        from vllm_gds_plugin.kernels.turboquant import dense_prefill

        d = md.num_decodes  # decode requests = decode tokens
        if d:
            self.ops.attention(query[:d], cache, md.block_table[:d], md.seq_lens[:d], md.query_start_loc[:d + 1],
                               self.scale, state, out=output[:d])
        dense_prefill.attention(query[d:n], cache, md.block_table[d:], md.prefill, self.scale, state,
                                md.prefill_attention, out=output[d:n])
        return output
