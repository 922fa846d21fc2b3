"""FP8 E4M3 quantization of a Hugging Face checkpoint into the pre-quantized layout vLLM's ``fp8`` method loads.

Per-tensor: ``<layer>.weight`` float8_e4m3fn + ``<layer>.weight_scale`` float32 scalar.
Block:      ``<layer>.weight`` float8_e4m3fn + ``<layer>.weight_scale_inv`` float32 [ceil(N/bn), ceil(K/bk)].
Both with ``quantization_config = {"quant_method": "fp8", "activation_scheme": "dynamic"[, "weight_block_size"]}``
(dequantized weight = fp8 value * scale, the convention of vLLM's Fp8LinearMethod for both names).

Per-channel FP8 is not a layout the ``fp8`` method loads (it only creates per-tensor and block scale parameters),
so it is refused rather than written in a format vLLM would misread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
_MIN_SCALE = 1e-12  # an all-zero tensor still gets a finite, positive scale
SCHEMES = ("per-tensor", "per-channel", "block")
DEFAULT_BLOCK = (128, 128)


class FP8Error(ValueError):
    """Unsupported FP8 request (scheme, block size, source layout)."""


@dataclass(frozen=True)
class FP8Scheme:
    name: str  # "per-tensor" | "block"
    block: tuple[int, int] | None = None  # (block_n, block_k) for "block"

    @classmethod
    def parse(cls, name: str, block: tuple[int, int] = DEFAULT_BLOCK) -> FP8Scheme:
        if name == "per-channel":
            raise FP8Error("--fp8-scheme per-channel: vLLM's 'fp8' method loads only per-tensor or block scales "
                           "for a pre-quantized checkpoint, so a per-channel FP8 checkpoint would not load the "
                           "same way; use per-tensor or block")
        if name not in SCHEMES:
            raise FP8Error(f"unknown --fp8-scheme {name!r}; choose per-tensor or block")
        if name == "block":
            if len(block) != 2 or min(block) <= 0:
                raise FP8Error(f"--fp8-block-size must be two positive integers, got {block}")
            return cls(name, (int(block[0]), int(block[1])))
        return cls(name)

    @classmethod
    def from_quantization_config(cls, qc: dict) -> FP8Scheme:
        """The scheme of an already-FP8 source checkpoint."""
        if qc.get("quant_method") != "fp8":
            raise FP8Error(f"source quantization_config quant_method={qc.get('quant_method')!r} is not supported "
                           "(only unquantized or 'fp8' checkpoints)")
        block = qc.get("weight_block_size")
        return cls("block", tuple(block)) if block else cls("per-tensor")

    @property
    def scale_suffix(self) -> str:
        return "weight_scale_inv" if self.name == "block" else "weight_scale"

    def quantization_config(self) -> dict:
        """The config.json ``quantization_config`` vLLM's fp8 method reads for this scheme."""
        qc: dict = {"quant_method": "fp8", "activation_scheme": "dynamic"}
        if self.block is not None:
            qc["weight_block_size"] = list(self.block)
        return qc

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the scale :meth:`quantize` returns for a weight of ``shape``."""
        if self.block is None:
            return ()
        return -(-shape[0] // self.block[0]), -(-shape[1] // self.block[1])

    def quantize(self, w: torch.Tensor, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(fp8 weight, float32 scale) with w ~= fp8.float() * scale (broadcast per block for "block").
        ``out``: where the per-tensor fp8 weight goes (memory the caller reuses); block scales make their own."""
        if w.dim() != 2:
            raise FP8Error(f"can only quantize 2-D linear weights, got shape {tuple(w.shape)}")
        if self.block:
            return quantize_block(w, self.block)
        return quantize_per_tensor(w, out)


# Elements per step of quantize_per_tensor, through one float32 scratch buffer per thread (8 MiB) reused across
# steps and tensors: a whole-tensor float32 temporary was fresh memory the kernel had to zero (profiled: the second
# largest CPU cost of an fp8 shard on the 2-core box). The step's three passes (widen, divide, narrow) run from
# cache when the scratch fits it: per 2^26 elements on the 2-core box 29 ms with 2^21-element steps against 59 ms
# with 2^24; tiny steps lose again (2^16: 44 ms), each being parallel regions that wait for every OpenMP thread.
# One fused pass (dividing the bf16 step by a 1-element float32 tensor into the fp8 output) was no faster at
# 2^20-2^21 and 6x slower from 2^22 (benchmarks/quant_variants.py).
_QUANT_STEP = 1 << 21
_scratch = threading.local()


def _float_scratch(n: int) -> torch.Tensor:
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < n:
        _scratch.buf = buf = torch.empty(max(n, 1), dtype=torch.float32)
    return buf[:n]


def quantize_per_tensor(w: torch.Tensor, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor FP8 of ``w`` into ``out`` (an fp8 tensor of w's shape; new when None): the same bytes as
    ``(w.float() / scale).clamp(-448, 448).to(float8_e4m3fn)``."""
    # max |w| from one min/max pass without a temporary (exact in any float dtype; measured 3x faster than
    # vector_norm(inf) on bf16). No clamp: |w| / (amax / 448) stays within a few float32 ulps of 448, which
    # rounds to 448 (the next e4m3fn value is 480, the halfway point 464).
    lo, hi = torch.aminmax(w)
    amax = torch.maximum(lo.abs(), hi.abs()).float()
    scale = (amax / FP8_MAX).clamp(min=_MIN_SCALE)
    q = torch.empty(w.shape, dtype=FP8_DTYPE) if out is None else out
    src, dst = w.reshape(-1), q.view(-1)
    for start in range(0, src.numel(), _QUANT_STEP):
        end = min(start + _QUANT_STEP, src.numel())
        tmp = _float_scratch(end - start)
        tmp.copy_(src[start:end])
        dst[start:end].copy_(tmp.div_(scale))
    return q, scale.reshape(())


def quantize_block(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    bn, bk = block
    n, k = w.shape
    nb, kb = -(-n // bn), -(-k // bk)
    padded = torch.zeros(nb * bn, kb * bk, dtype=torch.float32)
    padded[:n, :k] = w.float()
    blocks = padded.view(nb, bn, kb, bk)
    scale = (blocks.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=_MIN_SCALE)  # [nb, kb]
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).view(nb * bn, kb * bk)[:n, :k]
    return q.to(FP8_DTYPE).contiguous(), scale.contiguous()


def dequantize(q: torch.Tensor, scale: torch.Tensor, scheme: FP8Scheme) -> torch.Tensor:
    """float32 weight from an FP8 weight and its scale (inverse of FP8Scheme.quantize)."""
    if scheme.block is None:
        return q.float() * scale.float()
    bn, bk = scheme.block
    s = scale.float().repeat_interleave(bn, 0).repeat_interleave(bk, 1)
    return q.float() * s[: q.shape[0], : q.shape[1]]


def quantize_stream(tensors: Iterable[tuple[str, torch.Tensor]], scheme: FP8Scheme,
                    should_quantize: Callable[[str], bool],
                    dest: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """Rewrite an HF (name, tensor) stream into the FP8 checkpoint's stream, one tensor at a time (``dest(w)``:
    where w's fp8 weight goes, see :meth:`FP8Scheme.quantize`)."""
    for name, t in tensors:
        if should_quantize(name):
            q, s = scheme.quantize(t, dest(t) if dest is not None and scheme.block is None else None)
            yield name, q
            yield name[: -len("weight")] + scheme.scale_suffix, s
        else:
            yield name, t


def quantized_specs(specs: Iterable[tuple[str, tuple[int, ...], torch.dtype]], scheme: FP8Scheme,
                    should_quantize: Callable[[str], bool]) -> Iterator[tuple[str, tuple[int, ...], torch.dtype]]:
    """(name, shape, dtype) of what :func:`quantize_stream` yields for tensors of these specs, in the same order
    (a file layout can then be fixed before anything is quantized)."""
    for name, shape, dtype in specs:
        if should_quantize(name):
            yield name, shape, FP8_DTYPE
            yield name[: -len("weight")] + scheme.scale_suffix, scheme.scale_shape(shape), torch.float32
        else:
            yield name, shape, dtype


def linear_weight_selector(quantized_modules: set[str],
                           packed: dict[str, list[str]]) -> Callable[[str], bool]:
    """Which HF tensor names are FP8 weights, judged by the vLLM model itself.

    ``quantized_modules`` are the vLLM module names whose weight parameter is FP8 (e.g.
    model.layers.0.self_attn.qkv_proj); ``packed`` is the model's packed_modules_mapping, by which vLLM maps
    checkpoint modules (q_proj) to merged ones (qkv_proj), exactly as its quant configs do."""
    unpacked = {part: merged for merged, parts in packed.items() for part in parts}

    def select(name: str) -> bool:
        if not name.endswith(".weight"):
            return False
        module = name[: -len(".weight")]
        head, _, last = module.rpartition(".")
        merged = unpacked.get(last)
        return module in quantized_modules or (merged is not None and f"{head}.{merged}" in quantized_modules)

    return select
