"""Will it fit? Per-GPU memory and step FLOPs of a HunyuanCustom training layout, or the sampling mode for one GPU
(estimates).

    python -m hcustom_mc.plan --model 13b --variant audio --size 1280x720 --frames 129 \\
        --tp 4 --pp 2 --cp 2 --dp 8 --micro-batch-size 1 --recompute full --bf16
    python -m hcustom_mc.plan --model 13b --variant audio --size 1280x720 --frames 129 --bf16 \\
        --recompute full --gpus 32 --gpu-memory 80GB          # rank every layout of 32 GPUs that fits

    python -m hcustom_mc.plan --sample --model 13b --variant base --size 1280x720 --frames 129 \\
        --gpu-memory 24GB                                      # which --offload mode of the sampler fits

Training: pure arithmetic on the model config (no torch import): see hcustom_mc/plan/memory.py for what is
counted and what is not. Layout flags given together with --gpus constrain the search.
--sample: hcustom_mc/inference/memory.py's per-mode estimates (the DiT's parameters counted exactly on a
meta-device build, which imports torch); takes --tp, --cp, --identity-images, --text-len, --guidance-branches,
--offload-ahead, --weights, --step-cache.
Exit status: 0 fits (or no --gpu-memory given), 1 does not fit / no layout fits, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys

from hcustom_mc.model.config import VARIANTS, ConfigError, get_model_config, mode_overrides
from hcustom_mc.plan.memory import (GIB, GPU_RUNTIME_ALLOWANCE_GIB, RECOMPUTE_MODES, TRAINABLE, Layout, Training,
                                    Workload, estimate, in_flight_microbatches, step_time_s)

CP_COMM = ("ulysses", "ring", "usp")


class PlanError(ValueError):
    """Bad planner input: one message, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's default prints the whole usage first)
        from hcustom_mc.console import with_suggestion

        raise PlanError(with_suggestion(message, self))


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(GB|GIB|G|MB|MIB|M|TB|TIB)?\s*", text.upper())
    if not m:
        raise PlanError(f"--gpu-memory {text!r}: expected a size like 80GB, 141GB or 80GiB")
    unit = {"GB": 10**9, "G": 10**9, "GIB": 2**30, "MB": 10**6, "M": 10**6, "MIB": 2**20, "TB": 10**12,
            "TIB": 2**40, None: 10**9}[m.group(2)]
    return int(float(m.group(1)) * unit)


def parse_size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)x(\d+)", text.lower())
    if not m:
        raise PlanError(f"--size {text!r}: expected WIDTHxHEIGHT in pixels, e.g. 1280x720")
    w, h = int(m.group(1)), int(m.group(2))
    if w % 16 or h % 16 or w <= 0 or h <= 0:
        raise PlanError(f"--size {text}: width and height must be positive multiples of 16 (VAE /8, patch /2)")
    return w, h


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m hcustom_mc.plan", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="tiny | 13b | a ModelConfig file (JSON/YAML) (required)")
    p.add_argument("--variant", default="base", choices=VARIANTS, help="model variant (default: base)")
    p.add_argument("--mode", choices=("release", "paper"), help="conditioning mode (default: the preset's / file's mode)")
    p.add_argument("--size", required=True, help="video WIDTHxHEIGHT in pixels (required)")
    p.add_argument("--frames", type=int, required=True, help="pixel frames, 4k+1 (required)")
    p.add_argument("--identity-images", type=int, default=1, help="identity images per sample, 0: the t2v task (default: 1)")
    p.add_argument("--text-len", type=int, default=256, help="text tokens, the release's LLaVA prompt (default: 256)")
    for flag in ("--tp", "--pp", "--cp", "--dp"):
        p.add_argument(flag, type=int, help="layout size (default: 1; with --gpus: searched)")
    p.add_argument("--vpp", type=int, help="virtual pipeline stages per rank (default: not set: no interleaving)")
    p.add_argument("--cp-comm-type", choices=CP_COMM, help="context-parallel attention (default: ulysses; with --gpus: ulysses and ring searched)")
    p.add_argument("--ulysses-degree", type=int, help="usp: Ulysses group size (default: not set: the whole CP group)")
    p.add_argument("--sequence-parallel", action="store_true", help="sequence parallel: activations of norm/modulation/residual regions / TP (switch; default: off)")
    p.add_argument("--micro-batch-size", type=int, default=1, help="samples per micro batch (default: 1)")
    p.add_argument("--global-batch-size", type=int, help="samples per step (default: enough micro batches to fill the pipeline)")
    p.add_argument("--recompute", default="none", choices=RECOMPUTE_MODES, help="activation recomputation (default: none)")
    p.add_argument("--bf16", action="store_true", help="bf16 weights, fp32 main weights (switch; default: off: fp32)")
    p.add_argument("--trainable", default="all", choices=TRAINABLE, help="all | new (audio/editing branches) | lora (default: all)")
    p.add_argument("--lora-rank", type=int, default=0, help="LoRA rank, with --trainable lora (default: 0)")
    p.add_argument("--ema", action="store_true", help="count the EMA copy of --ema-decay (switch; default: off)")
    p.add_argument("--no-distributed-optimizer", action="store_true", help="optimizer state not sharded over DP (switch; default: off)")
    p.add_argument("--target", default="gpu", choices=("gpu", "cpu"),
                   help="gpu: fused Triton glue kernels + the CUDA runtime allowance; cpu: the torch reference path (default: gpu)")
    p.add_argument("--gpus", type=int, help="rank every valid layout of this many GPUs (default: not set: the one layout given)")
    p.add_argument("--gpu-memory", help="memory per GPU, e.g. 80GB, for the fit check (default: not set: no check)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="per-GPU dense bf16 peak TFLOP/s (default: 989, H100/H200)")
    p.add_argument("--mfu", type=float, default=0.5, help="assumed model FLOP utilisation for the time estimate (default: 0.5)")
    p.add_argument("--train-iters", type=int, help="steps of the run: adds its total wall time (default: not set)")
    p.add_argument("--top", type=int, default=10, help="layouts listed by --gpus (default: 10)")
    p.add_argument("--json", action="store_true", help="machine-readable output (switch; default: off)")
    s = p.add_argument_group("sampling (--sample)")
    s.add_argument("--sample", action="store_true", help="plan sampling on one GPU per rank instead of training: the "
                   "sampler's --offload modes with their estimated peak and the fastest that fits --gpu-memory (switch; "
                   "default: off)")
    s.add_argument("--guidance-branches", type=int, default=2, choices=(1, 2, 3),
                   help="model evaluations per step: 1 without CFG, 2 with (cfg_scale != 1), 3 with --ip-cfg-scale "
                        "(default: 2)")
    s.add_argument("--offload-ahead", type=int, default=1, help="the sampler's --offload-ahead (default: 1)")
    s.add_argument("--weights", default="all", choices=("all", "bf16", "fp8"),
                   help="DiT weight formats considered: bf16, fp8 (kept fp8, upcast per block) or all (default: all)")
    s.add_argument("--step-cache", action="store_true",
                   help="the sampler's step cache is on (--cache-threshold > 0): branches batched in every mode and "
                        "two stored residuals per branch (switch; default: off)")
    return p


TRAINING_ONLY = ("pp", "dp", "vpp", "gpus", "global_batch_size", "train_iters", "ulysses_degree", "cp_comm_type")


def plan_sampling(args, cfg, w: int, h: int) -> int:
    """--sample: the estimate of every sampling mode and the one the sampler's --offload auto would take."""
    from hcustom_mc import console

    console.setup()  # torch and megatron load below: their known import-time warnings are the console's to filter
    logging.getLogger().setLevel(logging.WARNING)  # this command prints its own report; no INFO lines between
    from hcustom_mc.inference.memory import HEADROOM, RUNTIME_ALLOWANCE, JobSize, budget_of, choose_mode, gib

    used = [f"--{n.replace('_', '-')}" for n in TRAINING_ONLY if getattr(args, n) is not None]
    used += [f for f, on in (("--sequence-parallel", args.sequence_parallel), ("--ema", args.ema),
                             ("--bf16", args.bf16)) if on]
    if used:
        raise PlanError(f"{', '.join(used)}: training flag(s); --sample plans one sampling rank (it takes --tp, --cp)")
    if not args.gpu_memory:
        raise PlanError("--sample needs --gpu-memory (e.g. 24GB): the mode chosen is the fastest that fits it")
    if args.offload_ahead < 0:
        raise PlanError(f"--offload-ahead must be >= 0, got {args.offload_ahead}")
    capacity = parse_bytes(args.gpu_memory)
    job = JobSize(w, h, args.frames, args.identity_images, args.guidance_branches, args.text_len)
    weights = ("bf16", "fp8") if args.weights == "all" else (args.weights,)
    choice = choose_mode(cfg, job, budget_of(capacity), weights=weights, tp=args.tp or 1, cp=args.cp or 1,
                         ahead=args.offload_ahead, step_cache=args.step_cache)
    if args.json:
        rows = [{"mode": r.mode, "weights": r.weights, "ahead": r.ahead, "peak_gib": r.peak / GIB,
                 "peak_phase": r.peak_phase, "fits": r.fits,
                 "phases_gib": {p: {k: v / GIB for k, v in t.items()} for p, t in r.phases.items()}} for r in choice.rows]
        print(json.dumps({"budget_gib": choice.budget / GIB, "rows": rows, "reason": choice.reason,
                          "chosen": None if choice.chosen is None else [choice.chosen.mode, choice.chosen.weights]},
                         indent=1))
        return 0 if choice.chosen else 1
    f = (args.frames - 1) // cfg.temporal_compression + 1
    print(f"ESTIMATE: sampling {args.model} ({args.variant}, {cfg.mode}) at {args.size} x {args.frames} frames ({f} latent "
          f"frames, {args.identity_images} identity image(s), {args.text_len} text tokens), {args.guidance_branches} "
          f"guidance branch(es), TP {args.tp or 1} x CP {args.cp or 1}")
    print(f"GPU memory {args.gpu_memory}: {gib(choice.budget)} usable (less {gib(RUNTIME_ALLOWANCE)} for the CUDA context "
          f"and workspaces, times {HEADROOM:g} against fragmentation); GiB per phase (hcustom_mc/inference/memory.py):")
    print(choice.table())
    flag = {"resident": "none", "encoders": "encoders", "blocks": "blocks"}
    print(f"choice: {choice.reason}")
    if choice.chosen is not None:
        print(f"sampler: --offload {flag[choice.chosen.mode]}"
              + (f" --offload-ahead {args.offload_ahead}" if choice.chosen.mode == "blocks" else "")
              + (" --fp8-weights on" if choice.chosen.weights == "fp8" else ""))
    return 0 if choice.chosen else 1



def check_inputs(args, cfg) -> None:
    if args.frames < 1 or (args.frames - 1) % cfg.temporal_compression:
        raise PlanError(f"--frames {args.frames}: must be 4k+1 (the causal VAE compresses time 4x), e.g. 129")
    for name in ("tp", "pp", "cp", "dp", "vpp", "gpus", "micro_batch_size", "global_batch_size", "train_iters"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise PlanError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.identity_images < 0 or args.identity_images > cfg.max_identity_images:
        raise PlanError(f"--identity-images {args.identity_images}: {cfg.mode} mode takes 0..{cfg.max_identity_images}")
    if args.text_len < 1:
        raise PlanError("--text-len must be >= 1")
    if args.trainable == "lora" and args.lora_rank < 1:
        raise PlanError("--trainable lora needs --lora-rank R (R >= 1)")
    if args.trainable == "new" and args.variant == "base":
        raise PlanError("--trainable new trains the audio / editing branches: the base variant has none")


def layout_problem(layout: Layout, cfg, work: Workload) -> str | None:
    """Why a layout cannot run (ParallelConfig.validate's rules plus the whole-frame CP split), or None."""
    from hcustom_mc.parallel.config import ParallelConfig

    pc = ParallelConfig(tensor_parallel=layout.tp, pipeline_parallel=layout.pp, virtual_pipeline_parallel=layout.vpp,
                        context_parallel=layout.cp, cp_mode=layout.cp_comm, ulysses_degree=layout.ulysses_degree,
                        sequence_parallel=layout.sequence_parallel)
    try:
        pc.validate(layout.world, cfg)
    except ConfigError as exc:
        return str(exc).replace("invalid parallel config:\n  - ", "").replace("\n  - ", "; ")
    frames = work.tokens(cfg)["latent_frames"] + work.identity_images
    if layout.cp > frames:
        return f"context parallel {layout.cp} exceeds the {frames} image frames (CP splits whole latent frames)"
    if work.global_batch and work.global_batch % (work.micro_batch * layout.dp):
        return f"global batch {work.global_batch} is not divisible by micro batch x DP = {work.micro_batch * layout.dp}"
    return None


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(args, gpus: int):
    for tp in ([args.tp] if args.tp else _divisors(gpus)):
        for pp in ([args.pp] if args.pp else _divisors(gpus // tp) if gpus % tp == 0 else []):
            rest = gpus // (tp * pp) if gpus % (tp * pp) == 0 else 0
            for cp in ([args.cp] if args.cp else _divisors(rest) if rest else []):
                if not rest or rest % cp:
                    continue
                dp = rest // cp
                if args.dp and args.dp != dp:
                    continue
                comms = [args.cp_comm_type] if args.cp_comm_type else (["ulysses", "ring"] if cp > 1 else ["ulysses"])
                for comm in comms:
                    yield Layout(tp=tp, pp=pp, cp=cp, dp=dp, vpp=args.vpp if pp > 1 else None, cp_comm=comm,
                                 ulysses_degree=args.ulysses_degree, sequence_parallel=args.sequence_parallel and tp > 1,
                                 distributed_optimizer=not args.no_distributed_optimizer)


def describe(layout: Layout) -> str:
    cp = f"CP {layout.cp}" + (f" ({layout.cp_comm}{' U' + str(layout.ulysses_degree) if layout.cp_comm == 'usp' else ''})"
                               if layout.cp > 1 else "")
    return (f"TP {layout.tp}{' +SP' if layout.sequence_parallel else ''} x PP {layout.pp}"
            f"{f' (VPP {layout.vpp})' if layout.vpp else ''} x {cp} x DP {layout.dp}")


def wall_time(seconds: float) -> str:
    """A run's length as people plan it: hours below two days, else days (with the hours)."""
    hours = seconds / 3600
    return f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} days ({hours:.0f} h)"


def _num_micro(work: Workload, layout: Layout) -> int:
    return work.global_batch // (work.micro_batch * layout.dp) if work.global_batch else layout.pp * (layout.vpp or 1)


def report_one(cfg, work, layout, train, args, capacity) -> tuple[str, dict]:
    est = estimate(cfg, work, layout, train, gpu=args.target == "gpu")
    n_micro = _num_micro(work, layout)
    t = step_time_s(est, layout, train, n_micro, args.peak_tflops, args.mfu)
    tok = est.tokens
    lines = [
        "ESTIMATE (arithmetic on the model config, not a measurement)",
        f"model {args.model} ({args.variant}, {cfg.mode}): hidden {cfg.hidden_size}, {cfg.num_double_blocks} double + "
        f"{cfg.num_single_blocks} single blocks, {est.params_total / 1e9:.3f} B parameters",
        f"sample: {args.size} x {args.frames} frames -> {tok['latent_frames']} latent frames x {tok['tokens_per_frame']} "
        f"tokens = {tok['video']} video + {tok['identity']} identity + {tok['text']} text tokens; micro batch "
        f"{work.micro_batch}, {n_micro} micro batches per step",
        f"layout: {describe(layout)} = {layout.world} GPUs; {'bf16' if train.bf16 else 'fp32'}, recompute "
        f"{train.recompute}, trainable {train.trainable}"
        f"{f' (LoRA rank {train.lora_rank})' if train.trainable == 'lora' else ''}; distributed optimizer "
        f"{'on' if layout.distributed_optimizer and layout.dp > 1 else 'off'}; {train.kernels} glue kernels",
        f"per GPU, pipeline stage {est.stage} (the largest), "
        f"{in_flight_microbatches(layout, est.stage, n_micro):g} micro batches of activations in flight:",
    ]
    for name, value in est.parts.items():
        lines.append(f"  {name:<52} {value / GIB:10.2f} GiB")
    lines.append(f"predicted peak (allocated by torch): {est.peak_gib:.{2 if est.peak_gib >= 1 else 4}f} GiB")
    verdict = None
    if args.target == "gpu":
        lines.append(f"on the GPU with {GPU_RUNTIME_ALLOWANCE_GIB:g} GiB for the CUDA context, cuBLAS and NCCL workspaces: "
                     f"{est.device_total_gib:.2f} GiB")
    if capacity:
        fits = est.peak_bytes + est.runtime_allowance_bytes <= capacity
        verdict = "fits" if fits else "does NOT fit"
        lines.append(f"verdict: {verdict} in {capacity / GIB:.1f} GiB per GPU "
                     f"({(capacity - est.peak_bytes - est.runtime_allowance_bytes) / GIB:+.1f} GiB headroom)")
    plain = est.flops_per_gpu / (args.peak_tflops * 1e12 * args.mfu)
    recompute = 4 / 3 if train.recompute == "full" else 1.0
    factors = ([", x 4/3 for full recompute (the forward runs twice)"] if recompute != 1.0 else []) + \
        ([f", x {t / (plain * recompute):.3f} for the pipeline bubble"] if layout.pp > 1 else [])
    lines.append(f"step FLOPs: {est.step_flops:.3e} (hcustom_mc.model.flops, recompute not counted), "
                 f"{est.flops_per_gpu:.3e} per GPU")
    lines.append(f"step time: ~{t:.1f} s at {args.mfu:.0%} MFU of {args.peak_tflops:g} TFLOP/s, all included: "
                 f"{plain:.1f} s of model FLOPs{''.join(factors)}")
    if args.train_iters:
        lines.append(f"run: {args.train_iters} steps x ~{t:.1f} s = {wall_time(args.train_iters * t)} of wall time "
                     f"(communication, data loading, checkpoint saves and restarts not counted)")
    untuned_attention = layout.cp > 1 and layout.cp_comm in ("ring", "usp")
    if untuned_attention:
        lines.append(f"{layout.cp_comm}: the ring's attention tiles (kernels/hcustom_kernels/block_attention.py) are untuned and "
                     "unmeasured, and the step time above assumes tuned attention; prefer ulysses where heads/TP "
                     "divide by CP")
    lines.append("not counted: allocator fragmentation (keep ~5-10% free), host memory, checkpoint-save staging")
    data = {"untuned_attention": untuned_attention, "layout": describe(layout), "peak_gib": est.peak_gib,
            "device_total_gib": est.device_total_gib,
            "parts_gib": {k: v / GIB for k, v in est.parts.items()}, "step_flops": est.step_flops,
            "flops_per_gpu": est.flops_per_gpu, "step_time_s": t,
            "run_time_s": args.train_iters * t if args.train_iters else None, "fits": verdict == "fits" if verdict else None,
            "samples_per_step": n_micro * work.micro_batch * layout.dp, "params_total": est.params_total,
            "params_trainable_stage": est.params_trainable}
    return "\n".join(lines), data


def rank_layouts(cfg, work, train, args, capacity) -> tuple[str, list[dict]]:
    rows, skipped = [], 0
    for layout in candidate_layouts(args, args.gpus):
        if layout_problem(layout, cfg, work):
            skipped += 1
            continue
        _, data = report_one(cfg, work, layout, train, args, capacity)
        data["seconds_per_sample"] = data["step_time_s"] / data["samples_per_step"]
        data["model_parallel"] = layout.tp * layout.pp * layout.cp
        rows.append(data)
    # communication and the ring's untuned attention tiles are not in the time model: among equal times,
    # Ulysses before ring, then less model parallelism (more DP) first
    rows.sort(key=lambda d: (not d["fits"] if d["fits"] is not None else False, round(d["seconds_per_sample"], 6),
                             d["untuned_attention"], d["model_parallel"], d["peak_gib"]))
    fitting = [d for d in rows if d["fits"]] if capacity else rows
    head = (f"ESTIMATE: layouts of {args.gpus} GPUs for {args.model} ({args.variant}) at {args.size} x {args.frames} "
            f"frames, {'bf16' if train.bf16 else 'fp32'}, recompute {train.recompute}"
            + (f", {capacity / GIB:.1f} GiB per GPU (incl. {GPU_RUNTIME_ALLOWANCE_GIB:g} GiB runtime allowance)"
               if capacity else "")
            + f"; {len(rows)} valid layouts, {skipped} invalid skipped")
    lines = [head]
    if capacity and not fitting:
        smallest = min(rows, key=lambda d: d["device_total_gib"]) if rows else None
        hints = ([] if train.recompute == "full" else ["--recompute full"]) + \
            ([] if args.sequence_parallel else ["--sequence-parallel"]) + ["more GPUs", "a smaller size or fewer frames"]
        lines.append("NONE FITS" + (f": the smallest needs {smallest['device_total_gib']:.1f} GiB per GPU "
                                    f"({smallest['layout']}); try {', '.join(hints)}" if smallest else ": no valid layout"))
        return "\n".join(lines), []
    lines.append(f"{'layout':<40} {'peak GiB':>9} {'+runtime':>9} {'s/sample':>9} {'PFLOP/GPU':>10}")
    for d in fitting[: args.top]:
        lines.append(f"{d['layout']:<40} {d['peak_gib']:9.2f} {d['device_total_gib']:9.2f} "
                     f"{d['seconds_per_sample']:9.2f} {d['flops_per_gpu'] / 1e15:10.2f}")
    if len(fitting) > args.top:
        lines.append(f"... {len(fitting) - args.top} more (--top N)")
    lines.append(f"best first: fits, then time per sample (model FLOPs at {args.mfu:.0%} MFU of {args.peak_tflops:g} "
                 f"TFLOP/s, times 4/3 with full recompute, times the pipeline bubble; communication not modelled), then least "
                 f"model parallelism (TP x PP x CP), then lowest peak")
    return "\n".join(lines), fitting


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        try:
            cfg = get_model_config(args.model, args.variant, **(mode_overrides(args.mode) if args.mode else {}))
        except (ConfigError, OSError, ValueError) as exc:
            raise PlanError(str(exc).replace("\n", " ")) from None
        check_inputs(args, cfg)
        w, h = parse_size(args.size)
        if args.sample:
            return plan_sampling(args, cfg, w, h)
        capacity = parse_bytes(args.gpu_memory) if args.gpu_memory else None
        work = Workload(width=w, height=h, frames=args.frames, identity_images=args.identity_images,
                        text_len=args.text_len, micro_batch=args.micro_batch_size, global_batch=args.global_batch_size)
        train = Training(recompute=args.recompute, bf16=args.bf16, trainable=args.trainable,
                         lora_rank=args.lora_rank, ema=args.ema,
                         kernels="triton" if args.target == "gpu" else "torch")
        if args.gpus:
            text, rows = rank_layouts(cfg, work, train, args, capacity)
            print(json.dumps(rows, indent=1) if args.json else text)
            return 0 if rows else 1
        layout = Layout(tp=args.tp or 1, pp=args.pp or 1, cp=args.cp or 1, dp=args.dp or 1, vpp=args.vpp,
                        cp_comm=args.cp_comm_type or "ulysses", ulysses_degree=args.ulysses_degree,
                        sequence_parallel=args.sequence_parallel, distributed_optimizer=not args.no_distributed_optimizer)
        problem = layout_problem(layout, cfg, work)
        if problem:
            raise PlanError(f"invalid layout {describe(layout)}: {problem}")
        text, data = report_one(cfg, work, layout, train, args, capacity)
        print(json.dumps(data, indent=1) if args.json else text)
        return 0 if data["fits"] is not False else 1
    except PlanError as exc:
        print(f"hcustom_mc.plan: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
