"""Compile every Triton kernel variant the ops launch (TurboQuant, the shard checksum) for an H100 (sm_90) on a
machine without a GPU.

The CPU interpreter accepts code the compiler refuses (e.g. a constexpr branch returning tensors of another shape
than the code after it), and GPU time is scarce. Here the public wrappers (store, attention, dequantize, dense
prefill) are called on CPU tensors with ``JITFunction.run`` replaced by a recorder, so no kernel runs; every
recorded launch (kernel, argument types, constexprs, warps, stages) is then compiled by Triton's CUDA backend
down to a cubin (ptxas ships with Triton, no driver needed). The attention kernel gets the GPU's register
codebook lookup (lut.py's inline PTX) as on CUDA. Run by tests/test_tq_compile.py in a fresh process, since
``TRITON_INTERPRET=1`` (set by the kernel tests) turns ``triton.jit`` into the interpreter.

    python tests/compile_sm90.py            # prints one line per compiled variant; exit 1 on any failure
"""

from __future__ import annotations

import os
import sys
import time

assert os.environ.get("TRITON_INTERPRET") != "1", "compile_sm90 needs the compiler, not the interpreter"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from vllm_gds_plugin.kernels.checksum import triton_checksum  # noqa: E402
from vllm_gds_plugin.kernels.turboquant import (  # noqa: E402
    dense_prefill,
    naive,
    triton_attention,
    triton_dequant,
    triton_store,
)
from vllm_gds_plugin.kvcache.presets import get_preset  # noqa: E402
from vllm_gds_plugin.kvcache.quantizer import TurboQuantState  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32",
         torch.int64: "i64", torch.int16: "i16", torch.uint8: "u8"}
Launch = tuple[JITFunction, tuple, dict]
recorded: list[Launch] = []


def record(self: JITFunction, *args, grid, warmup, **kwargs) -> None:
    recorded.append((self, args, kwargs))


def arg_type(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


def source(fn: JITFunction, args: tuple, kwargs: dict) -> tuple[ASTSource, dict, str]:
    """The kernel's ASTSource, compile options and a key naming the variant."""
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "maxnreg") if k in kwargs}
    values = dict(zip((p.name for p in fn.params), args)) | kwargs
    signature, constexprs = {}, {}
    for p in fn.params:
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[p.name] = values[p.name]
        else:
            signature[p.name] = arg_type(values[p.name])
    key = f"{fn.__name__} {sorted(signature.items())} {sorted((k, str(v)) for k, v in constexprs.items())} {options}"
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs), options, key


def exercise() -> None:
    """Call the wrappers with the shapes that pick each kernel variant (decode, prefill chunks short and long,
    split-KV, both tiles, each bit width of a half, head_dim 64/128/256, fp16/bf16)."""
    cases = [("turboquant", 128, torch.bfloat16), ("k2.5v3.5", 128, torch.float16), ("turboquant", 64, torch.bfloat16),
             ("3bit", 256, torch.bfloat16)]
    for preset, d, dtype in cases:
        hkv, g, block = 2, 4, 16
        state = TurboQuantState.build(get_preset(preset), d, 0, num_kv_heads=hkv)
        cache = torch.zeros(80, block, hkv, state.slot_bytes, dtype=torch.uint8)
        kv = torch.randn(8, hkv, d, dtype=dtype)
        for block_t in (1, 16):  # a decode step's token programs; a prefill chunk's tiles
            triton_store.store(kv, kv, cache, torch.arange(8), state, block_t=block_t)
        bt = torch.arange(80, dtype=torch.int32).view(2, 40)
        for q_lens in ([1, 1], [1, 3], [600, 600]):  # decode; short chunk; >= 1024 tokens (query/finish blocks)
            qsl = torch.tensor([0, *q_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
            q = torch.randn(sum(q_lens), hkv * g, d, dtype=dtype)
            seq_lens = torch.tensor([640, 640], dtype=torch.int32)
            for splits, tile in ((None, None), (4, triton_attention.Tile(16, 4, 1, 64, prefetch=2)),
                                 (4, triton_attention.Tile(16, 4, 1, 64, prefetch=1)),
                                 (4, triton_attention.Tile(128, 4, 1, 64, prefetch=2, maxnreg=160))):
                for fused in ("1", "0"):  # decode splits merged in place, or by the finish kernel (larger batches)
                    os.environ[triton_attention.FUSED_FINISH_ENV] = fused
                    triton_attention.attention(q, cache, bt, seq_lens, qsl, 0.1, state, num_splits=splits, tile=tile)
        os.environ.pop(triton_attention.FUSED_FINISH_ENV)
        tiles = torch.tensor([[0, 0, 0, 64]], dtype=torch.int32)
        ws = torch.empty(64, hkv, d, dtype=dtype)
        triton_dequant.dequantize(cache, bt, tiles, state, ws, ws.clone())
        plan = dense_prefill.plan([600, 600], [640, 640], 600, torch.device("cpu"))  # extra splits: lse merge
        dense_prefill.attention(torch.randn(1200, hkv * g, d, dtype=dtype), cache, bt, plan, 0.1, state,
                                naive.varlen_attention, torch.empty(1200, hkv * g, d, dtype=dtype))
    triton_checksum.checksums([torch.zeros(70000, dtype=torch.bfloat16), torch.zeros(8, dtype=torch.float32)])


def main() -> int:
    JITFunction.run = record
    # What attention() does on CUDA: 16-bit codebook values from registers (inline PTX), not the table gather.
    triton_attention.uses_register_lookup = lambda query: triton_attention.dot_dtype(query) != torch.float32
    exercise()
    assert any(fn.__name__ == "_attn_kernel" and kwargs["K_ASM0"] for fn, _, kwargs in recorded), "no inline-PTX lookup"
    failed, seen = 0, set()
    for fn, args, kwargs in recorded:
        src, options, key = source(fn, args, dict(kwargs))
        if key in seen:
            continue
        seen.add(key)
        t0 = time.time()
        try:
            triton.compile(src, target=TARGET, options=options)
            status = "ok"
        except Exception as exc:  # noqa: BLE001 - report every variant, then fail
            failed += 1
            status = f"FAILED: {exc!r}"[:2000]
        print(f"{fn.__name__} {options} {time.time() - t0:.1f} s {status}", flush=True)
    print(f"{len(seen)} variants for sm_90 (triton {triton.__version__}), {failed} failed")
    return 1 if failed or not seen else 0


if __name__ == "__main__":
    sys.exit(main())
