"""Per-GPU memory and step-FLOP estimate of one training layout: arithmetic on the model config only.

What is counted, per rank (the largest pipeline stage decides the peak):
  weights      every parameter of the stage, in the parameter dtype (bf16 or fp32)
  gradients    megatron DDP's fp32 gradient buffer (`grad_reduce_in_fp32`), trainable parameters only,
               whole on every rank (the distributed optimizer reduce-scatters it in place)
  optimizer    Adam exp_avg + exp_avg_sq (fp32) and, in bf16, the fp32 main weights; trainable
               parameters only, divided by DP under the distributed optimizer (on only at DP > 1)
  activations  what autograd keeps per token per block (the tables below, read off model/blocks.py
               and model/recompute.py), times the micro batches a pipeline stage holds in flight,
               plus the backward working set of one block
  comm buffers CP ring K/V receive buffers (double-buffered), Ulysses all-to-all outputs, the SP
               all-gather buffer, the pipeline send/receive tensors. DDP buckets are views of the
               gradient buffer (nothing extra).
  optimizer step: on CUDA torch's foreach AdamW holds one fp32 temporary of the parameters it updates
               (sqrt(exp_avg_sq)); on CPU the single-tensor AdamW two of the largest tensor. It runs
               after backward freed the activations, so the peak is static + max(activations, it).
Measured against real training steps on CPU (tests/test_plan.py): within about 4% at TP=PP=CP=DP=1 in
every recompute mode, at PP=2 and TP=2 (+SP: about 4% under); CP=2 (ring, Ulysses) about 7.5% under
(the CP attention's backward buffers are not itemised). The GPU (triton) tables are derived from the kernels' saved tensors and
are checked by the `gpu`-marked test only where a GPU runs it.
Not counted: allocator fragmentation, the CUDA context, cuBLAS / NCCL workspaces (a GPU target adds
the fixed GPU_RUNTIME_ALLOWANCE_GIB for those), Python/host memory, checkpoint-save staging, EMA
(`--ema-decay` adds one fp32 copy of the trainable shard: pass --ema).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from hcustom_mc.model.config import ModelConfig, split_layers
from hcustom_mc.model.flops import model_flops_per_sample
from hcustom_mc.model.parameters import stage_parameters

GIB = 2**30
# CUDA context (~0.5 GiB on Hopper), cuBLAS/cuDNN workspaces, NCCL communicator buffers: not in
# torch.cuda.max_memory_allocated, but on the GPU. A fixed allowance, stated in the output.
GPU_RUNTIME_ALLOWANCE_GIB = 2.0
RECOMPUTE_MODES = ("none", "selective", "full")
TRAINABLE = ("all", "new", "lora")
NEW_MODULES = ("audio_proj", "audio_models", "bg_in", "bg_proj")  # as training/loop.py NEW_MODULES
FP32 = 4


@dataclass
class Workload:
    width: int
    height: int
    frames: int
    identity_images: int = 1
    text_len: int = 256
    micro_batch: int = 1
    global_batch: int | None = None  # None: enough micro batches to fill the pipeline

    def tokens(self, cfg: ModelConfig) -> dict:
        """Token counts as the model builds its sequence: [identity ; video ; text] (model/model.py)."""
        _, ph, pw = cfg.patch_size
        f = (self.frames - 1) // cfg.temporal_compression + 1
        hw = (self.height // 8 // ph) * (self.width // 8 // pw)
        return {"latent_frames": f, "tokens_per_frame": hw, "video": f * hw,
                "identity": self.identity_images * hw, "image": (f + self.identity_images) * hw,
                "text": self.text_len}


@dataclass
class Layout:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 1
    vpp: int | None = None
    cp_comm: str = "ulysses"
    ulysses_degree: int | None = None
    sequence_parallel: bool = False
    distributed_optimizer: bool = True  # used only at DP > 1 (training/overlap.py)

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.cp * self.dp


@dataclass
class Training:
    recompute: str = "full"
    bf16: bool = True
    trainable: str = "all"
    lora_rank: int = 0
    ema: bool = False
    kernels: str = "triton"  # triton (GPU default: fused adaLN / QK-norm+RoPE) | torch (CPU reference path)


@dataclass
class Estimate:
    parts: dict = field(default_factory=dict)  # name -> bytes, for the worst stage
    stage: int = 0
    params_total: int = 0
    params_trainable: int = 0
    peak_bytes: int = 0
    runtime_allowance_bytes: int = 0
    step_flops: float = 0.0
    flops_per_gpu: float = 0.0
    tokens: dict = field(default_factory=dict)

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB

    @property
    def device_total_gib(self) -> float:
        return (self.peak_bytes + self.runtime_allowance_bytes) / GIB


# ----------------------------------------------------------------------------- parameters (model/parameters.py)
def trainable_count(params: dict[str, tuple[int, int]], trainable: str) -> int:
    """Parameters that get gradients and optimizer state (training/loop.py _is_trainable)."""
    new = sum(n for k, (n, _) in params.items() if k in NEW_MODULES)
    if trainable == "lora":
        return sum(a for _, a in params.values())
    return sum(n for n, _ in params.values()) if trainable == "all" else new


def largest_tensor(cfg: ModelConfig, tp: int, train: Training) -> int:
    """Elements of the largest trainable parameter tensor on a rank (single-tensor Adam's temporaries)."""
    H, M = cfg.hidden_size, cfg.mlp_hidden
    if train.trainable == "lora":
        return max(train.lora_rank * (3 * H + M), train.lora_rank * (H + M))
    new = [cfg.audio_input_dim * cfg.audio_proj_dim, cfg.audio_proj_dim * cfg.audio_tokens_per_frame * H] if cfg.audio else []
    new += [H * H, cfg.video_condition_channels * math.prod(cfg.patch_size) * H] if cfg.video_condition else []
    if train.trainable == "new":
        return max(new or [0])
    return max([6 * H * H // tp, (3 * H + M) * H // tp, M * H // tp, cfg.text_dim * H] + new)


# ----------------------------------------------------------------------------- activations
def block_bytes_per_token(cfg: ModelConfig, layout: Layout, train: Training) -> dict[str, float]:
    """Bytes autograd keeps per token of a double / single block, and a block's backward working set.

    Widths: r = residual region (hidden, /TP under sequence parallel), a = attention heads on this
    rank (hidden/TP), m = MLP width on this rank. e = activation bytes (the parameter dtype).
    Read off the blocks (torch reference path = CPU; triton = the fused GPU kernels in kernels/):
      double block, recompute none, per token of either stream:
        residual: block input, LN1 out + modulated (torch; triton keeps only the modulated), attn proj
                  out (kept by the gate), residual 1, LN2 out + modulated, fc2 out        8r (6r triton)
        heads:    joint q, k, v (cat, kept by attention), attention out, its [S, B, h*D] copy   5a
                  QK RMSNorm in fp32: the fp32 input (a copy in bf16; fp32: the qkv output itself,
                  3a) and the normalised value, for q and k                    (2a + 2a) x 4 bytes
                  (triton: the contiguous q, k copies the fused kernel keeps, 2a x e)
        mlp:      fc1 out (kept by GELU), GELU out (kept by fc2)                             2m
      single block: block input, LN out + modulated, linear2 out 4r; linear1 out (3a + m) (the
        GELU keeps its mlp part); rotated q, k (2a) + attention out (a); fc2's [attn ; gelu] input
        (a + m); QK RMSNorm as above.
      selective (model/recompute.py): LN outputs, the GELU output, linear2's input and the QK norm
        intermediates are freed and recomputed; double 4r + 8a + m, single 2r + (3a + m) + 4a.
      full: only each block's input (r) is kept between forward and backward; one block at a time is
        recomputed, so the recompute-none table of one block is added once.
    Backward working set (one block, at its largest): the gradient of the block output and of
    the stream being differentiated (2r), the attention backward's dq, dk, dv, dout (4a) and, for
    bf16 on CPU, its fp32 dq accumulator; or the MLP backward's two m-wide gradients.
    """
    H, tp = cfg.hidden_size, layout.tp
    e = 2 if train.bf16 else FP32
    r = H / tp if layout.sequence_parallel else H
    a = H / tp
    m = cfg.mlp_hidden / tp
    heads = cfg.num_heads / tp
    lse = heads * FP32
    if train.kernels == "triton":
        norm_keep = 2 * a * e  # contiguous q, k copies saved by kernels/hcustom_kernels/rope.py
        ln_extra = 0  # kernels/hcustom_kernels/adaln.py keeps x and row statistics, not the normalised value
    else:
        norm_keep = (2 * a + 2 * a) * FP32 if train.bf16 else (3 * a + 2 * a) * FP32
        ln_extra = 2 * r * e  # the two LayerNorm outputs kept by the modulation multiply
    if train.bf16 or train.kernels == "triton":
        single_norm = norm_keep
    else:
        single_norm = 2 * a * FP32  # fp32: the norm input is linear1's output, counted there
    double_none = (6 * r) * e + ln_extra + 5 * a * e + lse + norm_keep + 2 * m * e
    single_none = (2 * r) * e + ln_extra / 2 + (3 * a + m) * e + 3 * a * e + lse + (a + m) * e + single_norm
    double_sel = 4 * r * e + 8 * a * e + lse + m * e
    single_sel = 2 * r * e + (3 * a + m) * e + 4 * a * e + lse
    attn_bwd = 4 * a * e + (a * FP32 if train.bf16 and train.kernels == "torch" else 0)
    working = 2 * r * e + max(attn_bwd, 2 * m * e)
    return {"double_none": double_none, "single_none": single_none, "double_selective": double_sel,
            "single_selective": single_sel, "block_input": r * e, "working": working}


def audio_bytes_per_video_token(cfg: ModelConfig, train: Training) -> float:
    """One audio cross-attention (conditions.AudioCrossAttention, inject_audio) per video token: the
    block output it reads (kept by norm2), norm2 out, q (and its fp32 copy in bf16), the 16-key
    fp32 scores and probabilities (torch path; the triton kernel keeps q, k, v, lse), attention out."""
    H, A = cfg.hidden_size, cfg.audio_head_dim
    e = 2 if train.bf16 else FP32
    keys = 4 * cfg.audio_tokens_per_frame
    if train.kernels == "triton":
        return (2 * H + 2 * A) * e + FP32
    return (2 * H + 2 * A) * e + (A * FP32 if train.bf16 else 0) + 2 * keys * FP32 + keys * e


def in_flight_microbatches(layout: Layout, stage: int, num_micro: int) -> float:
    """Micro batches whose activations pipeline stage `stage` holds at once, in units of its whole layer
    share: 1F1B holds PP - rank; the interleaved schedule warms up (PP - rank - 1) * 2 + (VPP - 1) * PP
    chunk forwards (megatron's get_pipeline_parallel_schedule), each 1/VPP of the stage's layers."""
    pp, vpp = layout.pp, layout.vpp or 1
    if pp == 1:
        return 1.0
    if vpp == 1:
        return float(min(num_micro, pp - stage))
    total_chunks = num_micro * vpp
    warmup = min((pp - stage - 1) * 2 + (vpp - 1) * pp, total_chunks)
    return (warmup + 1) / vpp


# ----------------------------------------------------------------------------- the estimate
def estimate(cfg: ModelConfig, work: Workload, layout: Layout, train: Training, gpu: bool = True) -> Estimate:
    if train.recompute not in RECOMPUTE_MODES:
        raise ValueError(f"recompute must be one of {RECOMPUTE_MODES}")
    tok = work.tokens(cfg)
    cp, tp, e = layout.cp, layout.tp, (2 if train.bf16 else FP32)
    B = work.micro_batch
    img_local = math.ceil((tok["latent_frames"] + work.identity_images) / cp) * tok["tokens_per_frame"]  # whole frames
    seq_local = B * (img_local + tok["text"])  # text tokens are on every CP rank
    video_local = B * min(img_local, tok["video"])
    per_tok = block_bytes_per_token(cfg, layout, train)
    sp_div = tp if layout.sequence_parallel else 1
    num_micro = (work.global_batch // (B * layout.dp)) if work.global_batch else max(layout.pp * (layout.vpp or 1), 1)
    total_layers = cfg.num_double_blocks + cfg.num_single_blocks
    chunks = layout.pp * (layout.vpp or 1)
    ranges = split_layers(total_layers, chunks)
    best: Estimate | None = None
    all_params = sum(n for n, _ in stage_parameters(cfg, 1, range(total_layers)).values())  # the whole model
    for stage in range(layout.pp):
        mine = [ranges[v * layout.pp + stage] for v in range(layout.vpp or 1)]
        params = [stage_parameters(cfg, tp, c, train.lora_rank) for c in mine]
        n_all = sum(n for p in params for n, _ in p.values()) + sum(a for p in params for _, a in p.values())
        n_train = sum(trainable_count(p, train.trainable) for p in params)
        opt_share = layout.dp if (layout.distributed_optimizer and layout.dp > 1) else 1
        parts = {
            "weights": n_all * e,
            "gradients (fp32 DDP buffer)": n_train * FP32,
            "optimizer: Adam moments (fp32)": 2 * n_train * FP32 / opt_share,
        }
        if train.bf16:
            parts["optimizer: fp32 main weights"] = n_train * FP32 / opt_share
        if train.ema:
            parts["EMA (fp32)"] = n_train * FP32 / opt_share
        layers = [i for c in mine for i in c]
        nd = sum(1 for i in layers if i < cfg.num_double_blocks)
        ns = len(layers) - nd
        audio_blocks = sum(1 for i in cfg.audio_insert_blocks if i in layers) if cfg.audio else 0
        audio_tok = audio_bytes_per_video_token(cfg, train) * video_local
        one_block = max(per_tok["double_none"] if nd else 0, per_tok["single_none"] if ns else 0) * seq_local
        if train.recompute == "full":
            kept = len(layers) * per_tok["block_input"] * seq_local
            recomputed = one_block + (audio_tok if audio_blocks else 0)
        elif train.recompute == "selective":
            kept = (nd * per_tok["double_selective"] + ns * per_tok["single_selective"]) * seq_local + audio_blocks * audio_tok
            recomputed = 2 * cfg.mlp_hidden / tp * e * seq_local  # a refilled GELU output + its gradient
        else:
            kept = (nd * per_tok["double_none"] + ns * per_tok["single_none"]) * seq_local + audio_blocks * audio_tok
            recomputed = 0
        flight = in_flight_microbatches(layout, stage, num_micro)
        H = cfg.hidden_size
        first, last = stage == 0, stage == layout.pp - 1
        # inputs of a micro batch: fp32 latents + target, text states, RoPE cos/sin tables (torch path)
        inputs = B * (3 * cfg.in_channels * math.prod(cfg.patch_size) * tok["video"] / cp * FP32
                      + tok["text"] * cfg.text_dim * FP32)
        if train.kernels == "torch":
            inputs += 2 * img_local * cfg.head_dim * FP32 * B
        # final layer (last stage): LN out + modulated (torch) or modulated (triton), the velocity
        head = (video_local * H * e * (2 if train.kernels == "torch" else 1) if last else 0)
        head += video_local * cfg.out_channels * math.prod(cfg.patch_size) * (e + 2 * FP32) if last else 0
        # token refiner (first stage): text tokens through its blocks, about a double-block stream each
        refiner = cfg.num_refiner_blocks * per_tok["double_none"] * B * tok["text"] if first else 0
        if first and cfg.video_condition:  # bg_in's output, kept by bg_proj (one Linear; paper: four, + SiLUs)
            refiner += video_local * H * e * (1 if cfg.mode == "release" else 7)
        parts["activations (kept for backward)"] = flight * (kept + head + refiner + inputs)
        parts["activations (recompute + backward working set)"] = recomputed + per_tok["working"] * seq_local
        comm = 0.0
        if layout.pp > 1:  # send + receive of [S, B, H] activations and their gradients
            comm += 2 * seq_local * H / sp_div * e
        if cp > 1 and layout.cp_comm in ("ring", "usp"):
            ring_tokens = B * img_local
            comm += 2 * 2 * ring_tokens * H / tp * e + ring_tokens * H / tp * FP32  # K/V x2 buffers, fp32 out
        if cp > 1 and layout.cp_comm in ("ulysses", "usp"):
            comm += 4 * B * img_local * H / tp * e  # all-to-all outputs of q, k, v and the attention out
        if layout.sequence_parallel:
            comm += seq_local * H * e  # the all-gathered input of a column-parallel linear
        parts["communication buffers"] = comm
        static = parts["weights"] + parts["gradients (fp32 DDP buffer)"] + sum(
            v for k, v in parts.items() if k.startswith("optimizer") or k.startswith("EMA"))
        activ = parts["activations (kept for backward)"] + parts["activations (recompute + backward working set)"] + comm
        if gpu:  # foreach AdamW (CUDA default): one fp32 sqrt(exp_avg_sq) of the whole shard
            adam_temp = n_train * FP32 / opt_share
        else:  # single-tensor AdamW (CPU default): sqrt and its quotient of the largest tensor
            adam_temp = 2 * largest_tensor(cfg, tp, train) * FP32 if n_train else 0
        peak = static + max(activ, adam_temp)
        if best is None or peak > best.peak_bytes:
            best = Estimate(parts=parts, stage=stage, params_trainable=n_train, peak_bytes=int(peak))
            best.parts["optimizer step temporary (after backward)"] = adam_temp
    assert best is not None
    best.params_total = all_params
    best.tokens = tok
    samples = (work.global_batch or num_micro * B * layout.dp)
    best.step_flops = model_flops_per_sample(cfg, tok["image"], tok["text"]) * samples
    best.flops_per_gpu = best.step_flops / layout.world
    best.runtime_allowance_bytes = int(GPU_RUNTIME_ALLOWANCE_GIB * GIB) if gpu else 0
    return best


def step_time_s(est: Estimate, layout: Layout, train: Training, num_micro: int, peak_tflops: float, mfu: float) -> float:
    """Step time at `mfu` of `peak_tflops`: full recompute runs the forward twice (x 4/3), and the
    pipeline bubble adds (PP - 1) / (VPP x micro batches)."""
    work = est.flops_per_gpu * (4 / 3 if train.recompute == "full" else 1.0)
    bubble = (layout.pp - 1) / ((layout.vpp or 1) * max(num_micro, 1))
    return work / (peak_tflops * 1e12 * mfu) * (1 + bubble)
