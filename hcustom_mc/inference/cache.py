"""Identity-aware step caching: reuse the deep blocks' residual on denoising steps where it changes little.

What runs on every step. The embedders, the first `probe_blocks` DiT blocks (on the whole sequence: identity,
video and text tokens) and the head. What a cached step skips: the blocks after the probe; their residual
(output of the last block minus input of the first skipped block) is taken from the last step that ran them and
added to this step's probe output. The decision follows First-Block-Cache (ParaAttention: compare the first
block's residual with the one of the last computed step), calibrated on the model itself as EasyCache is at run
time, and bounded as MagCache bounds it (computed warm-up steps, a cap on consecutive skips):

- signal d: the relative L1 change, since the last computed step, of the probe blocks' residual, taken over the
  image tokens (identity + video) and over the identity tokens alone; d is the larger of the two, so a change in
  the few identity tokens is not averaged away by the many video tokens;
- calibration: on every computed step after the first, the real relative L1 change r of the deep residual (image
  tokens) since the previous computed step is measured beside d; the gain k = sum(r d) / sum(d^2) (least squares
  through the origin) turns d into an estimate r^ = k d. The first `warmup` steps are always computed (default
  20% of the steps, at least 2: MagCache's retention ratio 0.2), so every branch has calibration pairs before its
  first skip; k keeps learning from every later computed step;
- decision: a step is cached when r^ < threshold for every guidance branch, at most `max_skips` steps in a row,
  never in the warm-up and never in the last `final_steps` steps. The threshold therefore reads as "the deep
  residual is predicted to have moved by less than this fraction (relative L1) since it was computed".

Identity protection, explicitly:
1. The identity tokens pass through the probe blocks on every step, on the full sequence, so they and the video
   tokens' attention to them are fresh on every step, cached or not (tests/test_step_cache.py spies on it).
2. The decision signal includes the identity tokens' own change, as a separate term (d above), so a shift in how the
   video attends the reference decides for recomputation even where the video tokens' mean change is small.
3. One decision for all branches (cond, uncond, ip), taken on the largest estimate: guidance amplifies a
   difference between branches (u + g (c - u) with g = 7.5, and s_i (ip - c) for the identity guidance), so one
   stale branch beside a fresh one errs by g times its staleness, while branches reused together err by about
   their common staleness, which cancels in the difference. The identity-carrying branches (cond, ip) thus never
   run staler than the unconditional one, and the strictest branch decides for all.
4. The last step is always computed (`final_steps`, as TeaCache computes its last step): at flow shift 13 the
   final steps make the largest sigma moves and set the fine detail a face is judged by.

State is per branch (its probe and deep residuals of the last computed step, its calibration pairs, its counts);
the scalar bookkeeping (pairs, gains, counts) is replicated on every rank, the tensors live on the rank that runs
the branch. Branches batched in one forward (B = branches) are split along the batch; under CFG-parallel each
rank fills its own branch's entries. The per-step statistics are sums over this rank's token rows, all-reduced
over the model's TP and CP groups (and the CFG group under CFG-parallel), so every rank decides from the same
numbers (TP ranks hold the same rows without sequence parallelism: both sums of a ratio scale alike); the
decision is then agreed by a MIN all-reduce, so no rank can skip alone.

Threshold 0: nothing is ever skipped, and the computed steps run the very same operations as the plain forward
(the probe blocks, then the rest, from the same input), so the latents are bit-identical. The sampler does not
build a cache at threshold 0 (`CacheSettings.enabled`).
Cost: per branch the deep residual of the last computed step (this rank's rows x hidden, model dtype) and the
probe residual of its image rows (13B at 720p x 129 frames, bf16: about 0.75 GB each, 3 GB for two branches, divided
by CP); under TP / CP / CFG-parallel two or three all-reduces of a few numbers per step.
Not supported: pipeline-parallel models (the sampler runs at PP 1; validation during training does not cache).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from hcustom_mc.errors import ConfigError
from hcustom_mc.parallel.groups import group_rank, group_size

WARMUP_FRACTION = 0.2  # MagCache's retention ratio: the first 20% of the steps are always computed


@dataclass(frozen=True)
class CacheSettings:
    """The sampler's --cache-* flags. threshold 0 = off."""

    threshold: float = 0.0
    warmup: int | None = None  # None: ceil(0.2 x steps), at least 2
    probe_blocks: int = 1  # First-Block-Cache's single probe block: 1/60 of the 13B model's blocks
    max_skips: int = 3  # consecutive cached steps at most (MagCache's K)
    final_steps: int = 1  # the last steps, always computed

    @property
    def enabled(self) -> bool:
        return self.threshold > 0

    def check(self, num_blocks: int | None = None) -> "CacheSettings":
        """Raise one ConfigError listing every bad value (`num_blocks`: the model's, when known)."""
        errors = []
        if not (isinstance(self.threshold, (int, float)) and math.isfinite(self.threshold) and self.threshold >= 0):
            errors.append(f"--cache-threshold must be a finite number >= 0 (0 = off), got {self.threshold!r}")
        if self.warmup is not None and self.warmup < 2:
            errors.append(f"--cache-warmup must be >= 2 (the calibration needs two computed steps), got {self.warmup}")
        if self.probe_blocks < 1:
            errors.append(f"--cache-probe-blocks must be >= 1 (the identity tokens run through them on every step), "
                          f"got {self.probe_blocks}")
        elif num_blocks is not None and self.probe_blocks >= num_blocks:
            errors.append(f"--cache-probe-blocks {self.probe_blocks} leaves no block to cache: the model has "
                          f"{num_blocks} blocks")
        if self.max_skips < 1:
            errors.append(f"--cache-max-skips must be >= 1, got {self.max_skips}")
        if self.final_steps < 0:
            errors.append(f"final_steps must be >= 0, got {self.final_steps}")
        if errors:
            raise ConfigError("step cache: " + "; ".join(errors))
        return self

    def warmup_steps(self, steps: int) -> int:
        return self.warmup if self.warmup is not None else max(2, math.ceil(WARMUP_FRACTION * steps))


@dataclass
class BranchCache:
    """One guidance branch's state. Tensors are None on ranks that do not run the branch (CFG-parallel)."""

    computed: int = 0
    skipped: int = 0
    pairs: list[tuple[float, float]] = field(default_factory=list)  # (probe change d, deep change r) per computed step
    probe: torch.Tensor | None = None  # probe residual of the image rows at the last computed step
    residual: torch.Tensor | None = None  # deep residual (all rows held here) at the last computed step

    def gain(self) -> float:
        """k of r ~ k d, least squares through the origin; inf when the deep residual moved while the probe did
        not (the probe says nothing: never skip), 0 when neither moved (reuse is exact)."""
        dd = sum(d * d for d, _ in self.pairs)
        rd = sum(r * d for d, r in self.pairs)
        if dd > 0:
            return rd / dd
        return math.inf if any(r > 0 for _, r in self.pairs) or not self.pairs else 0.0


def _ratio(num: float, den: float) -> float:
    if den > 0:
        return num / den
    return 0.0 if num == 0 else math.inf


def _rel_l1_sums(now: torch.Tensor, refs: list[torch.Tensor], rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum |now - ref|, sum |ref|) per branch over the first `rows` rows; `now` [rows, branches x B, C] holds the
    branches side by side along the batch, `refs` each branch's [rows, B, C] (fp32 accumulation, no full copies)."""
    per = now.shape[1] // len(refs)
    num, den = [], []
    for j, ref in enumerate(refs):
        mine, ref = now[:rows, j * per : (j + 1) * per], ref[:rows]
        num.append((mine - ref).abs().sum(dtype=torch.float32))
        den.append(ref.abs().sum(dtype=torch.float32))
    return torch.stack(num).double(), torch.stack(den).double()


def local_rows(ctx) -> tuple[int, int]:
    """(image rows, identity rows) at the start of this rank's rows of the hidden state (ForwardContext ctx):
    the CP split keeps the identity frames first; sequence parallelism gives each TP rank a slice of the padded
    image stream, whose pad rows are left out."""
    seq = ctx.layout
    identity = max(0, min(ctx.frames.stop, ctx.num_identity) - ctx.frames.start) * ctx.tokens_per_frame
    if not seq.active:
        return ctx.image_len, identity
    start = group_rank(seq.group) * seq.local_image
    return tuple(max(0, min(seq.local_image, n - start)) for n in (ctx.image_len, identity))


class StepCache:
    """One sampling run's cache. The sampler calls `start` once, `begin_step` before each step, and runs the model
    through `forward`; `report()` gives the sidecar's counts."""

    def __init__(self, settings: CacheSettings):
        self.settings = settings.check()
        self.steps, self.step, self.warmup = 0, -1, 0
        self.names: list[str] = []
        self.mine: list[str] = []
        self.groups: list = []
        self.branches: dict[str, BranchCache] = {}
        self.last_computed: int | None = None
        self.run_of_skips = 0
        self.estimates: list[float | None] = []
        self.skipped_steps: list[int] = []
        self.num_blocks = 0

    def start(self, steps: int, names: list[str], mine: list[str], groups: list) -> None:
        """`names`: every branch, in the sampler's order; `mine`: those this rank runs, in its batch order;
        `groups`: the process groups a decision is agreed over (the model's TP and CP, and CFG under CFG-parallel)."""
        self.steps, self.names, self.mine, self.groups = steps, list(names), list(mine), list(groups)
        self.warmup = self.settings.warmup_steps(steps)
        self.branches = {n: BranchCache() for n in names}
        self.last_computed, self.run_of_skips, self.step = None, 0, -1
        self.estimates, self.skipped_steps = [None] * steps, []

    def begin_step(self, i: int) -> None:
        self.step = i

    # ------------------------------------------------------------------ collectives
    def _all_reduce(self, t: torch.Tensor, op=None) -> torch.Tensor:
        for g in self.groups:
            if group_size(g) > 1:
                dist.all_reduce(t, op=op or dist.ReduceOp.SUM, group=g)
        return t

    def _table(self, columns: list[torch.Tensor]) -> list[list[float]]:
        """Per-branch sums of my branches -> the [every branch x columns] table, summed over the groups."""
        table = torch.zeros(len(self.names), len(columns), dtype=torch.float64, device=columns[0].device)
        rows = [self.names.index(n) for n in self.mine]
        table[rows] = torch.stack(columns, dim=1)
        return self._all_reduce(table).tolist()

    # ------------------------------------------------------------------ the forward
    def forward(self, model, latents, timestep, text_states, text_mask, text_pooled, guidance=None,
                identity_latents=None, audio_features=None, video_condition=None) -> torch.Tensor:
        """`model(...)` (HunyuanCustomDiT.forward) with the blocks after the probe maybe replaced by the cached
        residual; the batch holds `mine` branches in order, equal shares each."""
        if not (getattr(model, "pre_process", False) and getattr(model, "post_process", False)):
            raise ConfigError("step caching needs every DiT block on each rank (pipeline parallel 1)")
        if not 0 <= self.step < self.steps:
            raise RuntimeError("StepCache.forward outside a step: call start() and begin_step() first")
        model.check_inputs(latents, timestep, text_states, text_mask, text_pooled, guidance, identity_latents,
                           audio_features, video_condition)
        vec, ctx = model.conditioning(latents, timestep, text_mask, text_pooled, guidance, identity_latents,
                                      audio_features)
        x = model.embed_tokens(latents, timestep, text_states, text_mask, ctx, identity_latents, video_condition)
        x = ctx.layout.scatter(x)
        layers = list(model.layers)
        self.num_blocks = len(layers)
        self.settings.check(len(layers))
        probe, rest = layers[: self.settings.probe_blocks], layers[self.settings.probe_blocks :]
        h = model.run_layers(x, vec, ctx, probe)
        y = self._deep_blocks(model, x, h, vec, ctx, rest)
        return model.head(y, vec, ctx)

    def _deep_blocks(self, model, x, h, vec, ctx, rest: list[int]) -> torch.Tensor:
        n = len(self.mine)
        if h.shape[1] % n:
            raise ValueError(f"the batch of {h.shape[1]} does not split into {n} branches")
        per = h.shape[1] // n
        n_img, n_id = local_rows(ctx)
        probe_res = h[:n_img] - x[:n_img]  # the probe blocks' residual on the image (identity + video) rows
        changes = None if self.last_computed is None else self._probe_changes(probe_res, n_id)
        if self._decide(changes):
            for j, b in enumerate(self.mine):  # h is not needed any more: add in place, no second copy
                h[:, j * per : (j + 1) * per] += self.branches[b].residual
            for b in self.names:
                self.branches[b].skipped += 1
            self.run_of_skips += 1
            self.skipped_steps.append(self.step)
            return h
        y = model.run_layers(h, vec, ctx, rest)
        deep = y - h
        if changes is not None:  # a calibration pair per branch: probe change vs the deep residual's real change
            sums = self._table(_rel_l1_sums(deep, [self.branches[b].residual for b in self.mine], n_img))
            for b, (num, den) in zip(self.names, sums):
                self.branches[b].pairs.append((changes[b], _ratio(num, den)))
        for j, b in enumerate(self.mine):
            state = self.branches[b]
            state.probe = probe_res[:, j * per : (j + 1) * per]
            state.residual = deep[:, j * per : (j + 1) * per]
        for b in self.names:
            self.branches[b].computed += 1
        self.last_computed, self.run_of_skips = self.step, 0
        return y

    def _probe_changes(self, probe_res: torch.Tensor, n_id: int) -> dict[str, float]:
        """d per branch: the probe residual's relative L1 change since the last computed step, the larger of the
        image tokens' and the identity tokens' alone (0 where there are none)."""
        refs = [self.branches[b].probe for b in self.mine]
        sums = self._table([*_rel_l1_sums(probe_res, refs, probe_res.shape[0]), *_rel_l1_sums(probe_res, refs, n_id)])
        return {b: max(_ratio(img, img_ref), _ratio(ident, ident_ref))
                for b, (img, img_ref, ident, ident_ref) in zip(self.names, sums)}

    def _decide(self, changes: dict[str, float] | None) -> bool:
        """Skip the deep blocks on this step? Every rank agrees (MIN over the groups)."""
        s, i = self.settings, self.step
        if changes is None:
            return False
        estimate = max(self.branches[b].gain() * changes[b] if changes[b] > 0 else 0.0 for b in self.names)
        self.estimates[i] = estimate
        allowed = (i >= self.warmup and i < self.steps - s.final_steps and self.run_of_skips < s.max_skips
                   and all(self.branches[b].pairs for b in self.names))
        want = allowed and estimate < s.threshold
        device = self.branches[self.mine[0]].probe.device
        flag = self._all_reduce(torch.tensor([1.0 if want else 0.0], dtype=torch.float64, device=device),
                                dist.ReduceOp.MIN)
        return bool(flag.item() > 0)

    # ------------------------------------------------------------------ bookkeeping
    def report(self) -> dict:
        """What the sidecar records: settings, the steps computed and skipped per branch, block evaluations."""
        s, P, N = self.settings, self.settings.probe_blocks, self.num_blocks
        branches = {b: {"computed": st.computed, "skipped": st.skipped,
                         "block_evaluations": st.computed * N + st.skipped * P,
                         "gain": None if not math.isfinite(st.gain()) else round(st.gain(), 6)}
                    for b, st in self.branches.items()}
        return {"enabled": True, "threshold": s.threshold, "warmup": self.warmup, "probe_blocks": P,
                "max_skips": s.max_skips, "final_steps": s.final_steps, "steps": self.steps, "blocks": N,
                "skipped_steps": list(self.skipped_steps),
                "estimates": [None if e is None or not math.isfinite(e) else round(e, 6) for e in self.estimates],
                "branches": branches,
                "block_evaluations": sum(b["block_evaluations"] for b in branches.values()),
                "block_evaluations_full": self.steps * N * len(branches)}

    def summary(self) -> str:
        """One log line."""
        r = self.report()
        per = ", ".join(f"{b} {v['computed']}" for b, v in r["branches"].items())
        frac = r["block_evaluations"] / max(1, r["block_evaluations_full"])
        return (f"step cache (threshold {r['threshold']:g}): computed {per} of {r['steps']} steps, skipped steps "
                f"{r['skipped_steps'] or 'none'}; blocks evaluated {100 * frac:.0f}% of full sampling")


def cache_off_report() -> dict:
    return {"enabled": False, "threshold": 0.0}
