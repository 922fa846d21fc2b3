"""Instruction mix of the TurboQuant decode attention loop for an H100 (sm_90), on a machine without a GPU.

The decode kernel is instruction-bound, not memory-bound (docs/turboquant.md), so its SASS is the quantity to cut.
This compiles the decode ``_attn_kernel`` variant the ops launch (tests/compile_sm90.py's recorder: the real
wrapper on CPU tensors, the GPU's inline-PTX codebook lookup), disassembles the cubin with Triton's bundled
nvdisasm and counts the instructions of the KV loop (the largest backward branch) by opcode.

    python benchmarks/kernel_sass.py [--preset turboquant] [--head-dim 128] [--gqa 4] [--sass OUT.sass]
    PYTHONPATH=~/.cache/vllm-gds-plugin/triton-3.6.0/site python benchmarks/kernel_sass.py   # the H100's Triton

Static counts only: which instructions the loop issues per tile, not how long they take (no GPU here). The
Triton version matters: 3.6.0 (the H100 machine's, unpacked by scripts/setup.sh) emits ~1.5x the loop
instructions of 3.9.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import compile_sm90  # noqa: E402  (asserts TRITON_INTERPRET is off)
import torch  # noqa: E402
import triton  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from vllm_gds_plugin.kernels.turboquant import triton_attention  # noqa: E402
from vllm_gds_plugin.kvcache.presets import get_preset  # noqa: E402
from vllm_gds_plugin.kvcache.quantizer import TurboQuantState  # noqa: E402

# nvdisasm writes each instruction's byte offset as 4 hex digits, more past 0xffff (4,096 instructions)
OPCODE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")
LABEL = re.compile(r"^\s*(\.L_x_\d+):")
BRANCH = re.compile(r"BRA\s+`?\(?(\.L_x_\d+)")


def decode_kernel_sass(preset: str, head_dim: int, gqa: int, maxnreg: int | None = None) -> tuple[str, int, int, str]:
    """SASS of the decode attention kernel (bf16 model, 8 KV heads, 4K context), its KV tile (BLOCK_N) and
    warps, and ptxas's register and spill line (``maxnreg``: a register cap, as Tile.maxnreg)."""
    JITFunction.run = compile_sm90.record
    triton_attention.uses_register_lookup = lambda query: True
    hkv = 8
    state = TurboQuantState.build(get_preset(preset), head_dim, 0, num_kv_heads=hkv)
    cache = torch.zeros(520, 16, hkv, state.slot_bytes, dtype=torch.uint8)
    bt = torch.arange(512, dtype=torch.int32).view(2, 256)
    q = torch.randn(2, hkv * gqa, head_dim, dtype=torch.bfloat16)
    triton_attention.attention(q, cache, bt, torch.tensor([4096, 4096], dtype=torch.int32),
                               torch.tensor([0, 1, 2], dtype=torch.int32), head_dim ** -0.5, state)
    fn, args, kwargs = next(r for r in compile_sm90.recorded if r[0].__name__ == "_attn_kernel")
    src, options, _ = compile_sm90.source(fn, args, dict(kwargs))
    if maxnreg:
        options["maxnreg"] = maxnreg
    kernel = triton.compile(src, target=compile_sm90.TARGET, options=options)
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as d:
        cubin, ptx = Path(d) / "k.cubin", Path(d) / "k.ptx"
        cubin.write_bytes(kernel.asm["cubin"])
        ptx.write_text(kernel.asm["ptx"])
        sass = subprocess.run([str(tools / "nvdisasm"), "-c", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
        ptxas = subprocess.run([str(tools / "ptxas"), f"-arch=sm_{compile_sm90.TARGET.arch}a", "-v", str(ptx), "-o",
                                str(Path(d) / "k.o")], capture_output=True, text=True, check=True).stderr
    regs = " ".join(m.group(0) for m in re.finditer(r"(Used \d+ registers|\d+ bytes spill \w+)", ptxas))
    return sass, kwargs["BLOCK_N"], kwargs["num_warps"], regs


def loop_lines(lines: list[str]) -> list[str]:
    """The body of the largest loop: from a label to the last branch back to it."""
    where = {m.group(1): i for i, line in enumerate(lines) if (m := LABEL.match(line))}
    loops = [(where[m.group(1)], i) for i, line in enumerate(lines)
             if (m := BRANCH.search(line)) and where.get(m.group(1), len(lines)) < i]
    start, end = max(loops, key=lambda se: se[1] - se[0])
    return lines[start:end + 1]


def opcodes(lines: list[str]) -> collections.Counter:
    return collections.Counter(m.group(1) for line in lines if (m := OPCODE.search(line)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="turboquant")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--gqa", type=int, default=4, help="query heads per KV head")
    ap.add_argument("--maxnreg", type=int, help="register cap per thread (Tile.maxnreg)")
    ap.add_argument("--sass", type=Path, help="also write the whole disassembly here")
    args = ap.parse_args()
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    sass, block_n, warps, regs = decode_kernel_sass(args.preset, args.head_dim, args.gqa, args.maxnreg)
    if args.sass:
        args.sass.write_text(sass)
    lines = sass.splitlines()
    body = opcodes(loop_lines(lines))
    total = sum(body.values())
    print(f"decode _attn_kernel, preset {args.preset}, head_dim {args.head_dim}, GQA {args.gqa}, sm_90, "
          f"triton {triton.__version__}: {sum(opcodes(lines).values())} instructions; KV loop: {total} per warp "
          f"x {warps} warps per {block_n}-token tile = {total * warps / block_n:.1f} warp-instructions per "
          f"(token, KV head); ptxas: {regs}")
    for op, n in body.most_common(20):
        print(f"  {op:10s} {n:5d}  {100 * n / total:5.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
