"""The HunyuanCustom diffusion transformer on megatron-core parallel layers.

Token sequence: [identity-image tokens (K*H'*W') ; noisy-video tokens (f*H'*W') ; text tokens].
Identity latents use the same patch embed as the video, are never noised, get the same timestep
modulation, and are dropped before the final layer. Parameter names equal the released
checkpoint keys, so at TP=1 `state_dict()` is the release layout.

Parallelism comes from outside: the model is given its process groups (a megatron-core
ProcessGroupCollection, hcustom_mc.parallel.groups) and its context-parallel attention strategy is built
from them (parallel/context.py); the block maths reads no global parallel state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.utils.checkpoint
from einops import rearrange

from megatron.core.enums import ModelType
from megatron.core.transformer.module import MegatronModule

from hcustom_mc.model.attention import JointAttention
from hcustom_mc.model.blocks import DoubleStreamBlock, SingleStreamBlock, TokenRefiner
from hcustom_mc.model.conditions import (
    AudioCrossAttention,
    AudioProjection,
    align_audio_tokens,
    audio_frames_expected,
    video_condition_projection,
)
from hcustom_mc.model.config import ModelConfig, split_layers  # noqa: F401  (split_layers: re-exported)
from hcustom_mc.model.layers import FinalLayer, MLPEmbedder, PatchEmbed, TimestepEmbedder
from hcustom_mc.model.ops import Rotary
from hcustom_mc.device import place_module, resolve_device
from hcustom_mc.model.spec import (LinearSubmodules, get_linear_submodules, local_linear_submodules, megatron_config,
                                  without_sequence_parallel)
from hcustom_mc.parallel.context import context_parallel_attention
from hcustom_mc.parallel.groups import group_rank, group_size, layout_process_groups, layout_virtual_pipeline
from hcustom_mc.parallel.sequence import SequenceLayout
from hcustom_mc.segments import Segments


class InputError(ValueError):
    """Inputs that cannot run: model tensors that do not fit the config, or a sampling job's bad files and
    settings (the message lists every problem); raised before any compute."""


@dataclass
class ForwardContext:
    """What every block needs besides the hidden state; built once per forward.

    Under context parallelism this rank holds the image tokens of the whole latent frames
    `frames` (a range over the K identity + f video frames); text tokens are on every rank.
    """

    batch: int
    grid: tuple[int, int, int]  # latent (f, H', W') after patching
    num_identity: int
    frames: range  # image frames (identity first, then video) held here
    image_len: int  # identity + video tokens held here
    rotary: Rotary
    attend: JointAttention
    audio: torch.Tensor | None  # [B, frames with audio here, 16, C] aligned audio tokens
    audio_start: int  # first image token (local) that gets audio

    @property
    def video_frames(self) -> range:
        """The video frames (0..f-1) held here."""
        K = self.num_identity
        return range(max(self.frames.start, K) - K, max(self.frames.stop, K) - K)

    @property
    def tokens_per_frame(self) -> int:
        return self.grid[1] * self.grid[2]

    @property
    def layout(self) -> SequenceLayout:
        """How the blocks' hidden state is held here (sequence parallel, parallel/sequence.py)."""
        return self.attend.layout


class HunyuanCustomDiT(MegatronModule):
    def __init__(self, cfg: ModelConfig, submodules: LinearSubmodules | None = None, params_dtype=torch.float32,
                 vp_stage: int | None = None, layers: range | None = None, cp_mode: str = "ulysses",
                 device: torch.device | str | None = None, config_overrides: dict | None = None,
                 pg_collection=None):
        """Build the whole model, or one pipeline stage of it.

        `pg_collection`: the process groups (megatron's ProcessGroupCollection, hcustom_mc.parallel.groups)
        this model runs on: `tp` shards every parallel linear, `cp` (`hcp` under usp) splits the image tokens,
        `pp` picks the stage. Default: the groups of the layout `initialize_parallel` set up, and that
        layout's virtual pipeline size (with a collection given, pass it as the config override
        virtual_pipeline_model_parallel_size, as megatron's own models read it from their config).
        Layers are numbered globally over [double blocks ; single blocks]. By default the stage is this
        rank's in the `pp` group (the whole model at PP=1). Blocks live in
        ModuleDicts keyed by their global index, so parameter names are the same at any PP.
        Every stage keeps the small conditioning embedders (time_in, vector_in, guidance_in, and
        audio_proj where it has audio blocks) because every block needs the modulation vector.
        `cp_mode` picks the context-parallel attention (ulysses, ring or usp; parallel/context.py) when CP > 1.
        Every parameter is created on `device` (default: `hcustom_mc.device.compute_device()`);
        `device="meta"` builds the structure without allocating anything (names and shapes).
        `config_overrides`: megatron TransformerConfig fields set by training (gradient_accumulation_fusion,
        sequence_parallel: the blocks then work on this rank's rows of the sequence, see parallel/sequence.py).
        """
        cfg.validate()
        config_overrides = dict(config_overrides or {})
        if pg_collection is None:
            pg_collection = layout_process_groups()
            config_overrides.setdefault("virtual_pipeline_model_parallel_size", layout_virtual_pipeline())
        device = resolve_device(device)
        if submodules is None and device.type == "meta":
            # megatron's TE linears cannot be built on the meta device: a non-CUDA device means
            # use_cpu_initialization, so TE allocates its weight on the CPU (device="cpu" explicitly) and
            # megatron then copies a meta master weight into it (NotImplementedError). megatron's local
            # linears have the same parameter names and per-rank shapes, which is all a meta build gives.
            submodules = local_linear_submodules()
        config = megatron_config(cfg, pg_collection, params_dtype, device, **config_overrides)
        super().__init__(config)
        self.pg_collection = pg_collection
        with torch.device(device):
            self._build(cfg, config, submodules, vp_stage, layers, cp_mode)
        self.to(params_dtype)
        if device.type != "meta":
            place_module(self, device)

    def _build(self, cfg, config, submodules, vp_stage, layers, cp_mode) -> None:
        self.model_type = ModelType.encoder_or_decoder  # read by megatron's pipeline schedules
        self.share_embeddings_and_output_weights = False  # read by megatron's finalize_model_grads
        self.vp_stage = vp_stage
        self.input_tensor = None
        self.cfg, self.cp_mode = cfg, cp_mode
        self.context_parallel = context_parallel_attention(cp_mode, self.pg_collection)
        # None | "full" (block inputs only, see run_layers) | "selective" (norms, modulation, MLP
        # activation, QK norm + RoPE recomputed; never the attention core: model/recompute.py)
        self.recompute_granularity: str | None = None
        self.recompute_method: str | None = None  # full only: None (every block) | "uniform" | "block"
        self.recompute_num_layers: int | None = None
        sub = submodules or get_linear_submodules()
        tp_group = self.pg_collection.tp
        total = cfg.num_double_blocks + cfg.num_single_blocks
        if layers is None:
            chunks, chunk = stage_chunk(self.pg_collection.pp, config.virtual_pipeline_model_parallel_size, vp_stage)
            self.layers, self.stage = split_layers(total, chunks)[chunk], (chunks, chunk)
        else:
            self.layers, self.stage = layers, (1, 0)
        self.pre_process = self.layers.start == 0
        self.post_process = self.layers.stop == total
        H, D = cfg.hidden_size, cfg.num_double_blocks

        if self.pre_process:
            self.img_in = PatchEmbed(cfg.patch_size, cfg.in_channels, H)
            # the refiner runs on the text alone, before the hidden state enters the SP region
            self.txt_in = TokenRefiner(cfg, without_sequence_parallel(config), sub, tp_group)
            if cfg.video_condition:
                self.bg_in = PatchEmbed(cfg.patch_size, cfg.video_condition_channels, H)
                self.bg_proj = video_condition_projection(cfg)
        self.time_in = TimestepEmbedder(H)
        self.vector_in = MLPEmbedder(cfg.pooled_text_dim, H)
        if cfg.guidance_embed:
            self.guidance_in = TimestepEmbedder(H)
        self.double_blocks = nn.ModuleDict({str(i): DoubleStreamBlock(cfg, config, sub, tp_group) for i in self.layers if i < D})
        self.single_blocks = nn.ModuleDict({str(i - D): SingleStreamBlock(cfg, config, sub, tp_group) for i in self.layers if i >= D})
        if cfg.audio:
            self.audio_slots = {i: n for n, i in enumerate(cfg.audio_insert_blocks) if str(i) in self.double_blocks}
            if self.audio_slots:
                self.audio_proj = AudioProjection(cfg)
                self.audio_models = nn.ModuleDict({str(n): AudioCrossAttention(cfg) for n in self.audio_slots.values()})
        if self.post_process:
            self.final_layer = FinalLayer(H, cfg.patch_size, cfg.out_channels, cfg.norm_eps)

    def weight_state_dict(self) -> dict[str, torch.Tensor]:
        """`state_dict()` without megatron's `_extra_state` entries: at TP=1 exactly the release keys."""
        return {k: v for k, v in self.state_dict().items() if not k.endswith("_extra_state")}

    # ------------------------------------------------------------------ inputs
    def check_inputs(self, latents, timestep, text_states, text_mask, text_pooled, guidance=None,
                     identity_latents=None, audio_features=None, video_condition=None) -> None:
        """Raise InputError naming the problem; runs before any compute."""
        cfg, errors = self.cfg, []
        if latents.ndim != 5:
            raise InputError(f"latents must be [B, C, F, H, W], got shape {tuple(latents.shape)}")
        B, C, f, h, w = latents.shape
        _, ph, pw = cfg.patch_size
        if C != cfg.in_channels:
            errors.append(f"latents have {C} channels, the model expects {cfg.in_channels}")
        if h % ph or w % pw:
            errors.append(f"latent height/width {h}x{w} must be divisible by the patch size {ph}x{pw}")
        if timestep.ndim != 1 or timestep.shape[0] != B:
            errors.append(f"timestep must have shape [{B}], got {tuple(timestep.shape)}")
        if text_states.ndim != 3 or text_states.shape[0] != B or text_states.shape[2] != cfg.text_dim:
            errors.append(f"text_states must be [{B}, L, {cfg.text_dim}], got {tuple(text_states.shape)}")
        elif tuple(text_mask.shape) != tuple(text_states.shape[:2]):
            errors.append(f"text_mask shape {tuple(text_mask.shape)} does not match text_states [B, L] = {tuple(text_states.shape[:2])}")
        else:
            m = text_mask.bool()
            if not m.any(dim=1).all():
                errors.append("every sample needs at least one valid text token (text_mask row of zeros)")
            # right padding: once a row turns False it stays False. The release's LLaVA mask breaks this (its
            # image-token ones are appended after the padding) and the released DiT copes: joint attention
            # counts the first sum(mask) text tokens valid, the refiner uses the positions as given. We do the same.
            if cfg.mode == "paper" and (m[:, 1:] & ~m[:, :-1]).any():
                errors.append("text_mask must be right-padded in paper mode (valid tokens first, then padding)")
        if tuple(text_pooled.shape) != (B, cfg.pooled_text_dim):
            errors.append(f"text_pooled must be [{B}, {cfg.pooled_text_dim}], got {tuple(text_pooled.shape)}")
        if cfg.guidance_embed and guidance is None:
            errors.append("this model embeds guidance (guidance_embed=True): pass guidance [B] (cfg scale x 1000)")
        if not cfg.guidance_embed and guidance is not None:
            errors.append("guidance was given but the model has no guidance embedder (guidance_embed=False)")
        if guidance is not None and tuple(guidance.shape) != (B,):
            errors.append(f"guidance must have shape [{B}], got {tuple(guidance.shape)}")
        K = 0
        if identity_latents is not None:
            if identity_latents.ndim != 5:
                errors.append(f"identity_latents must be [B, C, K, H, W], got {tuple(identity_latents.shape)}")
            else:
                K = identity_latents.shape[2]
                if identity_latents.shape[:2] != (B, cfg.in_channels) or identity_latents.shape[3:] != (h, w):
                    errors.append(f"identity_latents must be [{B}, {cfg.in_channels}, K, {h}, {w}], got {tuple(identity_latents.shape)}")
                if not 1 <= K <= cfg.max_identity_images:
                    errors.append(f"{K} identity images given; {cfg.mode} mode with this config supports 1..{cfg.max_identity_images}")
        if audio_features is not None:
            if not cfg.audio:
                errors.append("audio_features given but the model has no AudioNet (audio=False)")
            else:
                shape = (cfg.audio_window, cfg.audio_layers, cfg.audio_channels)
                need = audio_frames_expected(f, K, cfg.mode)
                if audio_features.ndim != 5 or audio_features.shape[0] != B or tuple(audio_features.shape[2:]) != shape:
                    errors.append(f"audio_features must be [{B}, frames, {shape[0]}, {shape[1]}, {shape[2]}], got {tuple(audio_features.shape)}")
                elif audio_features.shape[1] != need:
                    rule = "4*(f-1)+1 video frames (4k+1)" if cfg.mode == "release" else "(f+K)*4 padded frames"
                    errors.append(f"audio_features have {audio_features.shape[1]} frames but {f} latent frames need {need} = {rule}")
        if video_condition is not None:
            if not cfg.video_condition:
                errors.append("video_condition given but the model has no video-condition branch (video_condition=False)")
            elif tuple(video_condition.shape) != (B, cfg.video_condition_channels, f, h, w):
                errors.append(f"video_condition must be [{B}, {cfg.video_condition_channels}, {f}, {h}, {w}], got {tuple(video_condition.shape)}")
        if errors:
            raise InputError("invalid model inputs:\n  - " + "\n  - ".join(errors))

    # ------------------------------------------------------------------ stages
    def set_input_tensor(self, tensor) -> None:
        """megatron's pipeline schedules hand a stage its input here (a list of one tensor)."""
        self.input_tensor = tensor[0] if isinstance(tensor, (list, tuple)) else tensor

    def image_frames_here(self, num_frames: int) -> tuple[range, list[range]]:
        """(the image frames this rank holds, every CP rank's frames): the model's CP strategy decides."""
        parts = self.context_parallel.frames_per_rank(num_frames)
        return parts[self.context_parallel.rank], parts

    def video_frames_here(self, num_identity: int, latent_frames: int, tokens_per_frame: int) -> range:
        """The video frames (0..f-1) whose velocity this rank predicts (all of them without CP)."""
        frames, _ = self.image_frames_here(num_identity + latent_frames)
        K = num_identity
        return range(max(frames.start, K) - K, max(frames.stop, K) - K)

    def conditioning(self, latents, timestep, text_mask, text_pooled, guidance=None, identity_latents=None,
                     audio_features=None) -> tuple[torch.Tensor, ForwardContext]:
        """What every stage computes: the modulation vector [B, C] and the ForwardContext."""
        cfg = self.cfg
        B, _, f, h, w = latents.shape
        grid = (f // cfg.patch_size[0], h // cfg.patch_size[1], w // cfg.patch_size[2])
        hw = grid[1] * grid[2]
        dtype = self.time_in.mlp[0].weight.dtype
        vec = self.time_in(timestep) + self.vector_in(text_pooled.to(dtype))
        if cfg.guidance_embed:
            vec = vec + self.guidance_in(guidance)
        K = 0 if identity_latents is None else identity_latents.shape[2]
        frames, parts = self.image_frames_here(K + grid[0])
        rotary = Rotary(grid, K, cfg.mode, tuple(cfg.rope_dims), cfg.rope_theta, frames, latents.device,
                        identity_rope=cfg.identity_rope)
        audio, audio_start = None, 0
        if audio_features is not None and getattr(self, "audio_slots", None):
            audio = align_audio_tokens(self.audio_proj(audio_features.to(dtype)), grid[0], K, cfg.mode)
            # audio row i belongs to image frame i (paper: identity + video) or K + i (release: video only)
            first = K if cfg.mode == "release" else 0
            lo, hi = max(frames.start, first), max(frames.stop, first)
            audio, audio_start = audio[:, lo - first : hi - first], (lo - frames.start) * hw
        layout = SequenceLayout.build(len(frames) * hw, text_mask.shape[1], self.config.sequence_parallel,
                                      self.pg_collection.tp)
        attend = JointAttention(Segments.from_text_mask((K + grid[0]) * hw, text_mask), len(frames) * hw, layout,
                                self.context_parallel, [len(r) * hw for r in parts],
                                selective=self.recompute_granularity == "selective" and self.training)
        ctx = ForwardContext(batch=B, grid=grid, num_identity=K, frames=frames, image_len=len(frames) * hw, rotary=rotary,
                             attend=attend, audio=audio, audio_start=audio_start)
        return vec, ctx

    def embed_tokens(self, latents, timestep, text_states, text_mask, ctx: ForwardContext,
                     identity_latents=None, video_condition=None):
        """First stage: inputs -> hidden state [S, B, C] = [identity ; video ; text] tokens held here."""
        dtype = self.img_in.proj.weight.dtype
        K, frames, video_frames = ctx.num_identity, ctx.frames, ctx.video_frames
        # the patch embed has temporal patch 1, so embedding only this rank's frames is exact
        parts = []
        if K and frames.start < K:
            parts.append(self.img_in(identity_latents[:, :, frames.start : min(frames.stop, K)].to(dtype)))
        if len(video_frames):
            sel = slice(video_frames.start, video_frames.stop)
            video = self.img_in(latents[:, :, sel].to(dtype))
            if video_condition is not None:
                video = video + self.bg_proj(self.bg_in(video_condition[:, :, sel].to(dtype)))
            parts.append(video)
        text = self.txt_in(text_states.to(dtype), timestep, text_mask)
        return torch.cat([torch.cat(parts, dim=1).transpose(0, 1), text])

    def embed(self, latents, timestep, text_states, text_mask, text_pooled, guidance=None,
              identity_latents=None, audio_features=None, video_condition=None):
        """Inputs -> (hidden [S, B, C], vec [B, C], ForwardContext) on the first stage."""
        vec, ctx = self.conditioning(latents, timestep, text_mask, text_pooled, guidance, identity_latents, audio_features)
        x = self.embed_tokens(latents, timestep, text_states, text_mask, ctx, identity_latents, video_condition)
        return x, vec, ctx

    def inject_audio(self, x: torch.Tensor, ctx: ForwardContext, index: int) -> torch.Tensor:
        """Per-frame spatial cross-attention of `audio_models[index]` on the image tokens of x [S, B, C]."""
        hw = ctx.tokens_per_frame
        start = ctx.audio_start
        frames = ctx.audio.shape[1]
        tokens = x[start : start + frames * hw]  # [frames*HW, B, C]
        video = tokens.unflatten(0, (frames, hw)).permute(2, 0, 1, 3)  # [B, frames, HW, C]
        update = self.audio_models[str(index)](video, ctx.audio) * self.cfg.audio_strength
        update = update.permute(1, 2, 0, 3).flatten(0, 1)
        return torch.cat([x[:start], tokens + update, x[start + frames * hw :]])

    def run_layers(self, x, vec, ctx: ForwardContext, layers: list[int] | None = None) -> torch.Tensor:
        """This stage's blocks, in global order, with the audio cross-attention after its double blocks.
        `layers`: a consecutive part of them only (the sampler's step cache runs its probe blocks, then maybe
        the rest; both parts in turn do exactly what one call on all of them does).

        Full recompute, as megatron's --recompute-method: None checkpoints every block; "uniform" groups
        the blocks into runs of `recompute_num_layers` and keeps only each run's input; "block"
        checkpoints the first `recompute_num_layers` blocks of this chunk and runs the rest normally."""
        full = self.recompute_granularity == "full" and self.training and torch.is_grad_enabled()
        layers = list(self.layers) if layers is None else list(layers)
        for run, checkpointed in recompute_plan(layers, self.recompute_method if full else None,
                                                self.recompute_num_layers, full):
            if checkpointed:  # keep only the run's input; recompute its activations in backward
                x = torch.utils.checkpoint.checkpoint(self._run_blocks, x, vec, ctx, run, use_reentrant=False)
            else:
                x = self._run_blocks(x, vec, ctx, run)
        return x

    def _run_blocks(self, x, vec, ctx: ForwardContext, layers: list[int]) -> torch.Tensor:
        D = self.cfg.num_double_blocks
        for i in layers:
            block = self.double_blocks[str(i)] if i < D else self.single_blocks[str(i - D)]
            x = block(x, vec, ctx.rotary, ctx.attend)
            if i < D:
                if ctx.audio is not None and ctx.audio.shape[1] and i in self.audio_slots:
                    # per-frame cross-attention needs whole frames: leave the SP region around it
                    x = ctx.layout.scatter(self.inject_audio(ctx.layout.gather(x), ctx, self.audio_slots[i]))
        return x

    def head(self, x, vec, ctx: ForwardContext) -> torch.Tensor:
        """Video tokens held here -> [B, C_out, F_here, H, W] (identity and text tokens dropped)."""
        _, hh, ww = ctx.grid
        f = len(ctx.video_frames)
        x = ctx.layout.gather(x)  # the final layer is not tensor parallel: it runs on the whole sequence
        video = x[ctx.image_len - f * hh * ww : ctx.image_len]
        out = self.final_layer(video, vec)  # [f*H'*W', B, C*pt*ph*pw]
        pt, ph, pw = self.cfg.patch_size
        # unpatchify: each token's channels hold its pt x ph x pw patch of every output channel
        return rearrange(out, "(f h w) b (c pt ph pw) -> b c (f pt) (h ph) (w pw)", f=f, h=hh, w=ww, pt=pt, ph=ph, pw=pw)

    def forward(self, latents, timestep, text_states, text_mask, text_pooled, guidance=None,
                identity_latents=None, audio_features=None, video_condition=None, hidden=None) -> torch.Tensor:
        """Predict the flow-matching velocity for the noisy video latents [B, C, F, H, W].

        timestep: [B] in [0, 1000]; text_states [B, L, text_dim] with right-padded text_mask [B, L];
        text_pooled [B, pooled_text_dim] (CLIP); guidance [B] (x1000) for guidance-distilled models;
        identity_latents [B, C, K, H, W]; audio_features [B, N, window, layers, channels];
        video_condition [B, 32, F, H, W]. Audio or video condition left out skips that branch.
        A pipeline stage after the first takes the previous stage's output as `hidden` [S, B, C] (under
        sequence parallelism this rank's rows, `ForwardContext.layout`)
        (or from megatron's schedule through set_input_tensor); a stage before the last returns its
        hidden state instead of the velocity. Under context parallelism the velocity covers this
        rank's video frames (`ForwardContext.video_frames`).
        """
        self.check_inputs(latents, timestep, text_states, text_mask, text_pooled, guidance, identity_latents,
                          audio_features, video_condition)
        vec, ctx = self.conditioning(latents, timestep, text_mask, text_pooled, guidance, identity_latents, audio_features)
        if hidden is None:
            hidden = self.input_tensor
        if self.pre_process:
            x = self.embed_tokens(latents, timestep, text_states, text_mask, ctx, identity_latents, video_condition)
            x = ctx.layout.scatter(x)  # sequence parallel: this rank's rows from here to the head
        elif hidden is None:
            raise InputError("a pipeline stage after the first needs the previous stage's hidden state")
        else:
            x = hidden
        x = self.run_layers(x, vec, ctx)
        return self.head(x, vec, ctx) if self.post_process else x


def recompute_plan(layers: list[int], method: str | None, num_layers: int | None,
                   full: bool) -> list[tuple[list[int], bool]]:
    """Runs of consecutive layers and whether each run is checkpointed as one unit (see run_layers)."""
    if not full:
        return [(layers, False)] if layers else []
    if method is None:
        return [([i], True) for i in layers]
    n = 1 if num_layers is None else num_layers
    if method == "uniform":
        return [(layers[s : s + max(n, 1)], True) for s in range(0, len(layers), max(n, 1))]
    if method == "block":
        return [([i], True) for i in layers[:n]] + ([(layers[n:], False)] if layers[n:] else [])
    raise ValueError(f"recompute_method must be uniform or block, got {method!r}")


def stage_chunk(pp_group, virtual_pipeline: int | None = None, vp_stage: int | None = None) -> tuple[int, int]:
    """(number of model chunks, index of this rank's chunk) in megatron's interleaved order, for this rank of
    the pipeline group `pp_group` with `virtual_pipeline` chunks per rank."""
    pp, rank = group_size(pp_group), group_rank(pp_group)
    vpp = virtual_pipeline or 1
    if vpp > 1 and vp_stage is None:
        raise ValueError("virtual pipeline parallelism is on: pass vp_stage to build each model chunk")
    return pp * vpp, (vp_stage or 0) * pp + rank
