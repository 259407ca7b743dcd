"""Compile every Triton kernel in kernels/ for an H100/H200 (sm_90) on a machine without a GPU.

    python tests/sm90_compile.py [--json FILE]          (TRITON_INTERPRET must be unset: compiled kernels)

Each kernel module's public functions run once on meta-device tensors at the 13B model's shapes (720p x 129
frames: 24 heads x 128, hidden 3072, audio head 1024; ring attention's tile at CP 2), forward and backward.
No kernel executes: every `kernel[grid](...)` launch is recorded instead, with the arguments and launch
options the launcher chose for those shapes, and each distinct launch is then compiled ahead of time by
Triton (with its bundled ptxas) for sm_90: the same front end, optimisation passes and register allocation
a GPU run would go through. A launch whose kernel does not compile, or needs more shared memory than an
H100 has, fails the run. Printed per kernel: shared memory, registers and spill stack (cuobjdump); the JSON
also counts each kernel's own barriers (tl.debug_barrier in its Triton IR).

What it cannot show: run-time faults and numbers (the interpreter tests and the GPU check do that).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("error: TRITON_INTERPRET=1 is set; this compiles the kernels, run it without")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.checkout import use_checkout  # noqa: E402

use_checkout()
from hcustom_kernels import adaln, block_attention, frame_attention, rope  # noqa: E402

SM90_SHARED_BYTES = 232448  # the most dynamic shared memory one block may use on an H100 / H200 (227 KiB)
TARGET = GPUTarget("cuda", 90, 32)
TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int8: "i8", torch.int32: "i32",
         torch.int64: "i64", torch.bool: "i1"}


class Recorder:
    """Stands in for a JITFunction: `kernel[grid](*args, **kwargs)` records the launch and runs nothing."""

    def __init__(self, fn: JITFunction, launches: list):
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.fn, args, kwargs))


def record_launches(cases) -> list:
    launches: list = []
    for module in (adaln, block_attention, frame_attention, rope):
        for name, value in list(vars(module).items()):
            if isinstance(value, JITFunction) and name.endswith("_kernel"):
                setattr(module, name, Recorder(value, launches))
    block_attention._check_launchable = lambda name, device: None  # meta tensors stand in for CUDA ones
    for run in cases:
        run()
    return launches


def signature(fn: JITFunction, args: tuple, kwargs: dict) -> tuple[dict, dict, dict, dict]:
    """(signature, constexprs, attrs, options) of one recorded launch, typed as Triton types a real launch."""
    values = dict(zip([p.name for p in fn.params], args))
    values.update({k: v for k, v in kwargs.items() if k in {p.name for p in fn.params}})
    options = {k: v for k, v in kwargs.items() if k in ("num_warps", "num_stages")}
    sig, consts, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        v = values.get(p.name, p.default if hasattr(p, "default") else None)
        if p.is_constexpr:
            sig[p.name], consts[p.name] = "constexpr", v
            continue
        if isinstance(v, torch.Tensor):
            sig[p.name] = "*" + TYPES[v.dtype]
            aligned = (v.storage_offset() * v.element_size()) % 16 == 0  # torch allocations are 256-byte aligned
        elif isinstance(v, bool):
            sig[p.name], aligned = "i1", False
        elif isinstance(v, int):
            sig[p.name], aligned = ("i32" if -2**31 <= v < 2**31 else "i64"), v % 16 == 0
        elif isinstance(v, float):
            sig[p.name], aligned = "fp32", False
        else:
            raise TypeError(f"{fn.__name__}: argument {p.name} = {v!r} has no Triton type here")
        if aligned:  # what Triton's launcher specialises on: 16-byte aligned pointers, ints divisible by 16
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs, options


def resources(cubin: bytes, tmp: Path) -> str:
    """REG / STACK / SHARED line of cuobjdump -res-usage (empty when the tool is not there)."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return ""
    tmp.write_bytes(cubin)
    out = subprocess.run([str(tool), "-res-usage", str(tmp)], capture_output=True, text=True).stdout
    found = re.search(r"REG:\d+ STACK:\d+ SHARED:\d+ LOCAL:\d+", out)
    return found.group(0) if found else ""


def cases_13b(device="meta"):
    """Forward + backward of every kernel at the 13B shapes, in bf16 (the training and sampling dtype)."""
    dt = torch.bfloat16
    f, hp, wp, K, L, H, D, C, A = 33, 45, 80, 1, 256, 24, 128, 3072, 1024
    s_img = (K + f) * hp * wp
    S = s_img + L

    def rand(*shape, dtype=dt):
        return torch.empty(*shape, device=device, dtype=dtype, requires_grad=True)

    def backward(*outs):
        outs = [o for o in outs if o.requires_grad]
        torch.autograd.backward(outs, [torch.empty_like(o) for o in outs])

    def run_rope():
        q, k, wq, wk = rand(S, 1, H, D), rand(S, 1, H, D), rand(D), rand(D)
        backward(*rope.qk_norm_rope(q, k, wq, wk, grid=(f, hp, wp), num_identity=K, mode="release",
                                    rope_dims=(16, 56, 56), theta=256.0, eps=1e-6, image_len=s_img, frame_offset=0))

    def run_frame_attention():
        q, k, v = rand(1, f, hp * wp, A), rand(1, f, 16, A), rand(1, f, 16, A)
        backward(frame_attention.frame_cross_attention(q, k, v))
        with torch.no_grad():  # the sampler's forward keeps no log-sum-exp
            frame_attention.frame_cross_attention(q, k, v)

    def run_adaln():
        x, shift, scale, y = rand(S, 1, C), rand(1, C), rand(1, C), rand(S, 1, C)
        backward(adaln.layernorm_modulate(x, shift, scale, eps=1e-6))
        backward(adaln.gated_residual(x, shift, y))

    def run_block_attention():
        # a ring step at CP 2 for one TP 4 rank: 6 heads, half the image rows + text, one image chunk
        M, N = s_img // 2 + L, s_img // 2
        q, k, v = (torch.empty(1, 6, n, D, device=device, dtype=dt) for n in (M, N, N))
        dout = torch.empty(M, 1, 6, D, device=device, dtype=dt).permute(1, 2, 0, 3)  # ring.py's view
        q_pad = torch.zeros(1, M, dtype=torch.bool, device=device)
        out, lse = torch.empty(1, 6, M, D, device=device), torch.empty(1, 6, M, device=device)
        block_attention.merge_block_attention(q, k, v, q_pad, None, D ** -0.5, out, lse)
        grads = [torch.empty(t.shape, device=device) for t in (q, k, v)]
        block_attention.block_attention_backward(q, k, v, dout, lse, lse, q_pad, None, D ** -0.5, *grads)

    return [run_rope, run_frame_attention, run_adaln, run_block_attention]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    launches = record_launches(cases_13b())
    results, seen, failed = [], set(), 0
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"sm90_compile_{os.getpid()}.cubin"
    for fn, a, kw in launches:
        sig, consts, attrs, options = signature(fn, a, kw)
        key = (fn.__module__, fn.__name__, tuple(sorted(sig.items())), tuple(sorted(map(str, consts.items()))),
               tuple(sorted(attrs)), tuple(sorted(options.items())))
        if key in seen:
            continue
        seen.add(key)
        name = f"{fn.__module__.split('.')[-1]}.{fn.__name__}"
        row = {"kernel": name, "constexprs": {k: str(v) for k, v in consts.items()}, **options}
        try:
            compiled = triton.compile(ASTSource(fn, sig, consts, attrs), target=TARGET, options=options)
            row["shared_bytes"] = compiled.metadata.shared
            # barriers the kernel itself asks for (tl.debug_barrier), before the compiler adds its own
            # (gpu.barrier in Triton <= 3.5, ttg.barrier later)
            row["barriers"] = len(re.findall(r"\b(?:gpu|ttg)\.barrier\b", compiled.asm["ttir"]))
            row["resources"] = resources(compiled.asm["cubin"], tmp)
            row["ok"] = row["shared_bytes"] <= SM90_SHARED_BYTES
            if not row["ok"]:
                row["error"] = f"needs {row['shared_bytes']} bytes of shared memory; an H100 has {SM90_SHARED_BYTES}"
        except Exception as exc:  # a compile error: name it and go on to the next kernel
            row["ok"], row["error"] = False, f"{type(exc).__name__}: {str(exc)[:400]}"
        failed += not row["ok"]
        results.append(row)
        print(f"{'ok  ' if row['ok'] else 'FAIL'} {name} {row['constexprs']} warps={options.get('num_warps', 4)} "
              f"shared={row.get('shared_bytes')} barriers={row.get('barriers')} {row.get('resources', '')} "
              f"{row.get('error', '')}", flush=True)
    tmp.unlink(missing_ok=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(f"{len(results)} launches compiled for sm_90, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
