"""Block offload (hcustom_mc/inference/offload.py): the same outputs as the resident model, and at most ahead + 1
blocks materialised on the compute device at any point of a forward (the offloader's own bookkeeping, and the
blocks' tensors themselves, checked from inside every block's forward)."""

import pytest
import torch
import torch.nn as nn

from tests.conftest import NEEDS_CUDA

pytestmark = pytest.mark.usefixtures("single_process")


# ----------------------------------------------------------------------------- a generic block
class Fp8Linear(nn.Module):
    """A stand-in for an fp8-weight linear: a float8 weight and an fp32 scale buffer, upcast in forward."""

    def __init__(self, n: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("weight", (torch.randn(n, n, generator=g) * 0.3).to(torch.float8_e4m3fn))
        self.register_buffer("scale", torch.tensor(0.5))
        self.bias = nn.Parameter(torch.randn(n, generator=g).to(torch.bfloat16))

    def forward(self, x):
        return x @ (self.weight.float() * self.scale).T + self.bias.float()


class Block(nn.Module):
    def __init__(self, n: int, seed: int):
        super().__init__()
        self.fp8 = Fp8Linear(n, seed)
        self.dense = nn.Linear(n, n)
        self.shared = self.dense  # one module reachable twice: its tensors must be moved once
        self.register_buffer("offset", torch.full((n,), 0.1 * seed, dtype=torch.float64))

    def forward(self, x):
        return torch.tanh(self.shared(self.fp8(x)) + self.offset.float())


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def _watch(offloader, blocks):
    """Record, inside each block's forward, how many blocks are materialised and whether each is (its tensors are
    not the host tensors, exactly for the blocks the bookkeeping lists)."""
    host = [{t.host.data_ptr() for t in items} for items in offloader.tensors]
    seen = []

    def check(block, args):
        i = blocks.index(block)
        on_host = [[t.data_ptr() in host[j] for t in _tensors(b)] for j, b in enumerate(blocks)]
        assert all(all(h) or not any(h) for h in on_host)  # a block is wholly materialised or not at all
        materialised = [j for j, h in enumerate(on_host) if not any(h)]
        assert sorted(materialised) == sorted(offloader.live), (materialised, sorted(offloader.live))
        assert i in materialised
        seen.append(len(materialised))

    for b in blocks:  # registered after the offloader's: runs once its hook has materialised the block
        b.register_forward_pre_hook(check)
    return seen


@pytest.mark.parametrize("ahead", [0, 1, 2, 7])
def test_generic_blocks_of_any_dtype_stream_with_at_most_ahead_plus_one_on_the_device(ahead):
    from hcustom_mc.inference.offload import BlockOffloader

    blocks = [Block(8, s) for s in range(5)]
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = x
        for b in blocks:
            reference = b(reference)
        before = [[t.clone() for t in _tensors(b)] for b in blocks]
        offloader = BlockOffloader(blocks, "cpu", ahead=ahead)
        seen = _watch(offloader, blocks)
        for _ in range(2):  # a second forward starts over from the first block
            out = x
            for b in blocks:
                out = b(out)
            assert torch.equal(out, reference)
    assert max(seen) == min(ahead + 1, len(blocks)) == offloader.max_live
    assert len(seen) == 2 * len(blocks) and offloader.copies == 2 * len(blocks) and not offloader.live
    # every tensor kind was offloaded, its dtype kept, and the module is back on its host tensors, unchanged
    assert len(offloader.tensors[0]) == len(_tensors(blocks[0])) == 6
    assert {t.host.dtype for t in offloader.tensors[0]} == {torch.float8_e4m3fn, torch.float32, torch.bfloat16,
                                                           torch.float64}
    for b, old in zip(blocks, before):
        assert all(t.dtype == o.dtype and torch.equal(t.reshape(-1).view(torch.uint8), o.reshape(-1).view(torch.uint8))
                   for t, o in zip(_tensors(b), old))


def test_a_forward_with_gradients_is_refused():
    from hcustom_mc.inference.offload import BlockOffloader

    blocks = [Block(4, 0)]
    BlockOffloader(blocks, "cpu")
    with pytest.raises(RuntimeError, match="block offload is for sampling"):
        blocks[0](torch.randn(2, 4))


def test_an_interrupted_forward_leaves_no_stale_block():
    from hcustom_mc.inference.offload import BlockOffloader

    blocks = [Block(4, s) for s in range(4)]
    offloader = BlockOffloader(blocks, "cpu", ahead=1)
    with torch.no_grad():
        blocks[0](torch.randn(2, 4))
        with pytest.raises(RuntimeError):
            blocks[1](torch.randn(2, 5))  # wrong width: raises inside the block, its post-hook never runs
        assert sorted(offloader.live) == [1, 2]
        x = torch.randn(2, 4)
        for b in blocks:  # the next forward releases them before it goes on
            x = b(x)
            assert len(offloader.live) <= 2
    assert offloader.max_live == 2 and not offloader.live
    offloader.detach()
    assert not blocks[0]._forward_pre_hooks and not blocks[0]._forward_hooks


# ----------------------------------------------------------------------------- the DiT under the sampler
def _model(variant="base", **overrides):
    from hcustom_mc.model import HunyuanCustomDiT
    from hcustom_mc.model.config import get_model_config
    from hcustom_mc.model.init import initialize_weights

    cfg = get_model_config("tiny", variant, **overrides)
    model = HunyuanCustomDiT(cfg).eval().requires_grad_(False)
    initialize_weights(model, seed=3, zero_init=False)  # every weight random: no block is an identity
    return model


def _branches(cfg, K: int, frames=3, h=4, w=6, text_len=7, seed=0):
    """uncond / cond / ip DiT inputs of batch 1, shaped as prepare_conditions makes them."""
    from hcustom_mc.model.conditions import audio_frames_expected

    g = torch.Generator().manual_seed(seed)
    ident = torch.randn(1, cfg.in_channels, K, h, w, generator=g)
    out = {}
    for name in ("uncond", "cond", "ip"):
        mask = torch.ones(1, text_len, dtype=torch.long)
        mask[0, text_len - 2:] = 0
        b = dict(text_states=torch.randn(1, text_len, cfg.text_dim, generator=g), text_mask=mask,
                 text_pooled=torch.randn(1, cfg.pooled_text_dim, generator=g), identity_latents=ident)
        if cfg.audio:
            n = audio_frames_expected(frames, K, cfg.mode)
            b["audio_features"] = torch.randn(1, n, cfg.audio_window, cfg.audio_layers, cfg.audio_channels, generator=g)
        out[name] = b
    noise = torch.randn(1, cfg.in_channels, frames, h, w, generator=g)
    return noise, out


MODELS = {"base": ("base", {}, 1), "audio": ("audio", {}, 1),
          "paper_multi_identity": ("base", {"mode": "paper", "max_identity_images": 3}, 2)}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("ahead", [0, 1])
def test_offloaded_sampling_gives_the_resident_latents_bit_for_bit(name, ahead):
    from hcustom_mc.inference.offload import BlockOffloader, model_blocks
    from hcustom_mc.inference.pipeline import ParallelSampler, SamplerLayout

    variant, overrides, K = MODELS[name]
    model = _model(variant, **overrides)
    noise, branches = _branches(model.cfg, K)
    run = dict(steps=3, shift=5.0, cfg_scale=6.0, ip_cfg_scale=2.0)  # three branches: uncond, cond, ip
    resident = {per: ParallelSampler(model, SamplerLayout()) for per in (False, True)}
    expected = {}
    for per, sampler in resident.items():
        sampler.branch_per_forward = per
        expected[per] = sampler.sample(noise, branches, **run)
    blocks = model_blocks(model)
    offloader = BlockOffloader.attach(model, "cpu", ahead=ahead)
    seen = _watch(offloader, blocks)
    for per in (False, True):
        sampler = ParallelSampler(model, SamplerLayout())
        sampler.branch_per_forward = per
        assert torch.equal(sampler.sample(noise, branches, **run), expected[per]), f"branch_per_forward={per}"
    forwards = 3 * (1 + 3)  # steps x (one batched forward + one per branch)
    assert len(seen) == forwards * len(blocks) and offloader.copies == forwards * len(blocks)
    assert max(seen) == offloader.max_live == ahead + 1 and not offloader.live
    # the non-block modules never moved: they are the model's own tensors, not offloaded copies
    offloaded = {t.host.data_ptr() for items in offloader.tensors for t in items}
    rest = [p for n, p in model.named_parameters() if not n.startswith(("double_blocks.", "single_blocks."))]
    assert rest and not any(p.data_ptr() in offloaded for p in rest)
    assert sum(len(items) for items in offloader.tensors) + len(rest) == len(list(model.parameters()))


def test_one_forward_per_branch_matches_the_batched_forward():
    """The blocks mode runs the guidance branches one per forward: the same model on the same inputs, batch 1
    instead of 3; on the CPU the results agree to float32 rounding (the matmuls' blocking may differ with M)."""
    from hcustom_mc.inference.pipeline import ParallelSampler, SamplerLayout

    model = _model("audio")
    noise, branches = _branches(model.cfg, 1)
    out = []
    for per in (False, True):
        sampler = ParallelSampler(model, SamplerLayout())
        sampler.branch_per_forward = per
        out.append(sampler.sample(noise, branches, steps=3, shift=5.0, cfg_scale=6.0, ip_cfg_scale=2.0))
    torch.testing.assert_close(out[1], out[0], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- GPU: memory against the planner
@pytest.mark.gpu
def test_offloaded_forward_peak_is_within_the_planner_estimate():
    """On a GPU: the model built in host memory, its blocks streamed with ahead 1; torch.cuda.max_memory_allocated
    of one forward (one branch, as the blocks mode runs) against the planner's denoise-phase estimate (DiT weights
    on the device + activations + latents) of that mode, and far below the resident weights."""
    from hcustom_mc.inference.memory import JobSize, sampling_estimate
    from hcustom_mc.inference.offload import BlockOffloader
    from hcustom_mc.inference.pipeline import ParallelSampler, SamplerLayout
    from hcustom_mc.model import HunyuanCustomDiT
    from hcustom_mc.model.config import get_model_config
    from hcustom_mc.model.init import initialize_weights

    if not torch.cuda.is_available():
        pytest.skip(NEEDS_CUDA)
    cfg = get_model_config("tiny", "base", hidden_size=1024, num_heads=8, rope_dims=(16, 56, 56),
                           num_double_blocks=4, num_single_blocks=8, text_dim=256, pooled_text_dim=64)
    model = HunyuanCustomDiT(cfg, params_dtype=torch.bfloat16, device="cpu").eval().requires_grad_(False)
    initialize_weights(model, seed=0, zero_init=False)
    device = torch.device("cuda")
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    offloader = BlockOffloader.attach(model, device, ahead=1)
    job = JobSize(width=512, height=320, frames=33, identity_images=1, branches=2, text_len=64)
    noise, branches = _branches(cfg, 1, frames=(job.frames - 1) // 4 + 1, h=job.height // 8, w=job.width // 8,
                                text_len=job.text_len)
    branches = {k: {n: t.to(device, torch.bfloat16) if t.is_floating_point() else t.to(device) for n, t in b.items()}
                for k, b in branches.items() if k != "ip"}
    sampler = ParallelSampler(model, SamplerLayout())
    sampler.branch_per_forward = True
    sampler.sample(noise, branches, steps=1, shift=5.0, cfg_scale=6.0)  # warm-up (kernels, workspaces)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    sampler.sample(noise, branches, steps=1, shift=5.0, cfg_scale=6.0)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    est = sampling_estimate(cfg, job, "blocks", "bf16", ahead=1, encoders={})
    planned = sum(est.phases["denoise"].values())
    resident = sampling_estimate(cfg, job, "resident", "bf16", encoders={}).phases["denoise"]["DiT weights"]
    print(f"offloaded forward: measured {peak / 2**20:.1f} MiB, planned {planned / 2**20:.1f} MiB, resident weights "
          f"{resident / 2**20:.1f} MiB, blocks at once {offloader.max_live}")
    assert offloader.max_live == 2
    assert peak <= planned, (peak, planned)
    assert planned <= 3 * peak, f"the estimate {planned} is more than 3x the measured {peak}: it no longer describes it"
    assert peak < resident, "offloading did not keep the blocks off the device"
    offloader.detach()


# ----------------------------------------------------------------------------- the sampler command
@pytest.fixture(scope="module")
def release_checkpoint(tmp_path_factory):
    """A random tiny base model saved as a release file, the tiny encoders and an identity image."""
    from PIL import Image

    from hcustom_mc.checkpoint.release import save_release_state_dict
    from hcustom_mc.encoders.tiny import save_tiny_encoders

    root = tmp_path_factory.mktemp("offload_cli")
    model = _model("base")
    save_release_state_dict(model.weight_state_dict(), root / "ckpt")
    save_tiny_encoders(root / "enc", model.cfg)
    g = torch.Generator().manual_seed(1)
    Image.fromarray((torch.rand(48, 64, 3, generator=g) * 255).byte().numpy()).save(root / "man.png")
    jobs = [{"task": "identity", "prompt": "A man walks.", "subjects": [["man", str(root / "man.png")]],
             "cfg_scale": 1.0, "seed": 3},  # one guidance branch: one forward per step in both modes
            {"task": "identity", "prompt": "A man runs.", "subjects": [["man", str(root / "man.png")]], "seed": 4}]
    import json

    (root / "jobs.json").write_text(json.dumps(jobs))
    return root


def _sample_cli(root, out, *extra):
    import subprocess
    import sys

    from tests.torchrun import REPO, child_pythonpath

    cmd = [sys.executable, "-m", "hcustom_mc.sample", "--checkpoint", root / "ckpt", "--model-config", "tiny",
           "--encoders-dir", root / "enc", "--jobs", root / "jobs.json", "--height", 32, "--width", 48, "--frames", 5,
           "--steps", 2, "--out", out, "--no-progress", *extra]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": child_pythonpath()}
    proc = subprocess.run(list(map(str, cmd)), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout + proc.stderr


def test_sampler_offload_blocks_gives_the_resident_videos(release_checkpoint, tmp_path):
    """`--offload blocks` (encoders in turn, blocks streamed, one branch per forward) against the default (auto: on
    the CPU everything resident): the one-branch job's latents bit for bit, the two-branch job's to float32
    rounding (batch 1 vs 2 forwards), and the same decoded frames. `--offload encoders`: the same files."""
    import json

    from hcustom_mc.inference.output import read_mp4

    log_none = _sample_cli(release_checkpoint, tmp_path / "none")
    log_blocks = _sample_cli(release_checkpoint, tmp_path / "blocks", "--offload", "blocks", "--offload-ahead", 1)
    # --offload encoders (the DiT resident, the encoders in turn, branches batched): the resident files byte for byte
    log_encoders = _sample_cli(release_checkpoint, tmp_path / "encoders", "--offload", "encoders")
    assert "memory: the DiT resident, the encoders in turn (--offload encoders)" in log_encoders
    for name in ("000_identity", "001_identity"):
        for suffix in (".latents.pt", ".mp4"):
            assert (tmp_path / "none" / f"{name}{suffix}").read_bytes() == \
                (tmp_path / "encoders" / f"{name}{suffix}").read_bytes(), name + suffix
        side = json.loads((tmp_path / "encoders" / f"{name}.json").read_text())
        assert side["memory"]["offload"] == "encoders" and side["peak_memory"]["bytes"] > 0
    assert "memory: everything resident (auto: the compute device is the CPU" in log_none
    assert "memory: block offload (--offload blocks)" in log_blocks and "4 blocks streamed to cpu, 1 ahead" in log_blocks
    for n, exact in ((0, True), (1, False)):
        name = f"00{n}_identity"
        a = torch.load(tmp_path / "none" / f"{name}.latents.pt", weights_only=True)
        b = torch.load(tmp_path / "blocks" / f"{name}.latents.pt", weights_only=True)
        if exact:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        fa, fb = read_mp4(tmp_path / "none" / f"{name}.mp4")[0], read_mp4(tmp_path / "blocks" / f"{name}.mp4")[0]
        assert fa.shape == fb.shape and (fa.astype(int) - fb.astype(int)).__abs__().max() <= 1
        side = json.loads((tmp_path / "blocks" / f"{name}.json").read_text())
        assert side["memory"]["offload"] == "blocks" and side["memory"]["blocks_on_device_at_most"] == 2
        assert json.loads((tmp_path / "none" / f"{name}.json").read_text())["memory"] == {"offload": "none"}


def test_blocks_mode_loads_the_encoders_the_dit_and_the_vae_in_turn(release_checkpoint, tmp_path, single_process,
                                                                   monkeypatch):
    """`_generate_in_turn` in this process: the text encoders are gone (collected) before the DiT's modules reach the
    device, and the DiT is gone before the VAE is loaded again to decode."""
    import argparse
    import gc
    import weakref

    import hcustom_mc.sample as sample
    from hcustom_mc.data.config import EncoderPaths
    from hcustom_mc.encoders.text import LlavaTextEncoder
    from hcustom_mc.encoders.vae import VideoVAE
    from hcustom_mc.inference.inputs import SampleJob, resolve_job
    from hcustom_mc.inference.offload import BlockOffloader
    from hcustom_mc.inference.pipeline import SamplerLayout
    from hcustom_mc.model.config import get_model_config

    events, alive = [], {}
    load_llava, load_vae, attach = LlavaTextEncoder.from_pretrained.__func__, VideoVAE.from_pretrained.__func__, \
        BlockOffloader.attach.__func__

    def llava(cls, *a, **kw):
        encoder = load_llava(cls, *a, **kw)
        alive["llava"] = weakref.ref(encoder)
        events.append("llava")
        return encoder

    def vae(cls, *a, **kw):
        gc.collect()
        events.append("vae" + (" (DiT alive)" if "dit" in alive and alive["dit"]() is not None else ""))
        return load_vae(cls, *a, **kw)

    def offload(cls, model, *a, **kw):
        gc.collect()
        events.append("DiT to device" + (" (LLaVA alive)" if alive["llava"]() is not None else ""))
        alive["dit"] = weakref.ref(model)
        return attach(cls, model, *a, **kw)

    monkeypatch.setattr(LlavaTextEncoder, "from_pretrained", classmethod(llava))
    monkeypatch.setattr(VideoVAE, "from_pretrained", classmethod(vae))
    monkeypatch.setattr(BlockOffloader, "attach", classmethod(offload))
    root = release_checkpoint
    jobs = [resolve_job(SampleJob(task="identity", prompt="A man walks.", subjects=[("man", str(root / "man.png"))],
                                  height=32, width=48, frames=5, steps=1, output=str(tmp_path / f"j{n}")))
            for n in range(2)]
    args = sample.parse_args(["--checkpoint", str(root / "ckpt"), "--offload", "blocks", "--no-progress"])
    paths = EncoderPaths(llava=str(root / "enc/llava"), clip=str(root / "enc/clip"), vae=str(root / "enc/vae"))
    cfg = get_model_config("tiny", "base")
    sample._generate_in_turn(args, jobs, root / "ckpt", "release", cfg, SamplerLayout(),
                             paths, [], single_process, torch.float32, 1, "test", stream_blocks=True)
    assert events == ["llava", "vae", "DiT to device", "vae"]  # nothing "alive" that should be gone
    assert all((tmp_path / f"j{n}.mp4").is_file() for n in range(2))


def test_a_negative_offload_ahead_is_refused_before_anything_loads(tmp_path):
    from hcustom_mc.model.config import ConfigError
    from hcustom_mc.sample import parse_args, run

    args = parse_args(["--checkpoint", str(tmp_path / "missing"), "--offload", "blocks", "--offload-ahead", "-1"])
    with pytest.raises(ConfigError, match="--offload-ahead must be >= 0 blocks, got -1"):
        run(args)  # before the checkpoint (which does not exist) is even looked at


def test_the_cuda_path_orders_copies_waits_and_host_syncs(monkeypatch):
    """The CUDA branch's protocol, with stand-ins for streams and events recording what is called (the copies
    themselves stay on the CPU): every copy is made inside the side stream and records an event; the compute
    stream waits on a block's event before the block runs and marks its tensors as used there; the host waits for
    block i - 1 before block i's setup (so its memory can take the next copy); block i + 1 is copied while block i
    runs. The whole sequence of one forward, event by event."""
    from hcustom_mc.inference import offload as offload_module
    from hcustom_mc.inference.offload import BlockOffloader

    log, state = [], {"side": False}

    class Stream:
        def __init__(self, name):
            self.name = name

        def wait_event(self, event):
            log.append(("wait", self.name, event.name))

    side, compute = Stream("side"), Stream("compute")

    class Event:
        count = 0

        def __init__(self):
            Event.count += 1
            self.name = f"e{Event.count}"

        def record(self, stream):
            log.append(("record", stream.name, self.name))

        def synchronize(self):
            log.append(("sync", self.name))

    class StreamContext:
        def __init__(self, stream):
            assert stream is side

        def __enter__(self):
            state["side"] = True

        def __exit__(self, *exc):
            state["side"] = False

    copy_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        if kwargs.get("non_blocking"):
            assert state["side"], "a block copy outside the side stream"
            log.append(("copy",))
            kwargs = {"copy": True}
        return copy_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "stream", StreamContext)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: compute)
    monkeypatch.setattr(torch.Tensor, "to", to)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: log.append(("used on", stream.name)))

    blocks = [Block(4, s) for s in range(4)]
    offloader = BlockOffloader(blocks, "cpu", ahead=1)
    offloader.stream = side  # what a CUDA device gets: the same code from here on
    x = torch.randn(2, 4)
    with torch.no_grad():
        reference = x
        for b in blocks:
            reference = b(reference)  # the offloader runs here too (CPU side of the stand-ins)
        log.clear()
        out = x
        for b in blocks:
            log.append(("run", blocks.index(b)))
            out = b(out)
    assert torch.equal(out, reference)
    per_block = len(offloader.tensors[0])
    # name the events by role: copy k (recorded on the side stream), done k (on the compute stream after block k)
    names, copies, done, steps = {}, 0, -1, []
    for entry in log:
        if entry[0] == "copy":
            copies += 1
            continue
        if entry[0] == "used on":
            steps.append(("used on", entry[1]))
            continue
        if entry[0] == "record" and entry[1] == "side":
            assert copies == per_block, "a copy event must follow exactly one block's tensors"
            copies = 0
            names[entry[2]] = f"copy {sum(v.startswith('copy') for v in names.values())}"
        elif entry[0] == "record":
            done += 1
            names[entry[2]] = f"done {done}"
        event = entry[-1] if entry[0] in ("record", "wait", "sync") else None
        steps.append(entry if event is None else (*entry[:-1], names.get(event, "done of the forward before")))
    used = [("used on", "compute")] * per_block
    expected = []
    for k in range(4):
        expected += [("run", k), ("sync", f"done {k - 1}" if k else "done of the forward before")]
        expected += [("record", "side", "copy 0")] if k == 0 else []  # block 0 was not prefetched
        expected += [("wait", "compute", f"copy {k}"), *used]
        expected += [("record", "side", f"copy {k + 1}")] if k < 3 else []  # the next block, during this one
        expected += [("record", "compute", f"done {k}")]
    assert steps == expected
    assert offloader.max_live == 2 and not offloader.live


@pytest.mark.slow
def test_blocks_with_fp8_and_the_step_cache_equals_resident_with_them(release_checkpoint, tmp_path):
    """Block offload composes with fp8 weights and the step cache: the cache batches the branches in every mode, so
    blocks + fp8 + cache equals resident + fp8 + cache bit for bit, with the same steps skipped, and the sidecar
    records all three."""
    import json

    fast = ("--fp8-weights", "on", "--cache-threshold", 0.5, "--cache-warmup", 2, "--steps", 8)
    _sample_cli(release_checkpoint, tmp_path / "fast_none", "--offload", "none", *fast)
    _sample_cli(release_checkpoint, tmp_path / "fast_blocks", "--offload", "blocks", *fast)
    for n in range(2):
        name = f"00{n}_identity"
        assert torch.equal(torch.load(tmp_path / "fast_none" / f"{name}.latents.pt", weights_only=True),
                           torch.load(tmp_path / "fast_blocks" / f"{name}.latents.pt", weights_only=True))
        none, blocks = (json.loads((tmp_path / k / f"{name}.json").read_text()) for k in ("fast_none", "fast_blocks"))
        assert blocks["memory"]["offload"] == "blocks" and blocks["memory"]["blocks_on_device_at_most"] == 2
        assert blocks["weights"]["fp8_weights"] == "on" and blocks["cache"]["enabled"]
        assert blocks["cache"]["skipped_steps"] == none["cache"]["skipped_steps"]
    # the threshold is high enough that the cache skips steps here (else the comparison above says little)
    assert json.loads((tmp_path / "fast_blocks" / "001_identity.json").read_text())["cache"]["skipped_steps"]


def test_host_arena_packs_tensors_into_slabs():
    """The host side of CUDA offload (here unpinned: the same code with pin_memory=False): every tensor keeps its
    dtype, shape and values, contiguous, at an aligned offset in a slab; a slab fills before the next is taken; a
    tensor larger than a slab gets its own allocation. Pinned per tensor, torch would round each up to a power of two."""
    from hcustom_mc.inference.offload import HostArena

    arena = HostArena(pin=False, slab_bytes=4096)
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(10, 7, generator=g),  # 280 bytes: offset 0
               torch.randn(3, generator=g).to(torch.bfloat16),  # 6: 512
               (torch.randn(64, 16, generator=g) * 8).to(torch.float8_e4m3fn),  # 1024: 1024
               torch.randn(5, 9, generator=g).t(),  # 180, not contiguous: 2048
               torch.randn(2000, generator=g),  # 8000 > a slab: its own
               torch.zeros(0),  # nothing
               torch.arange(6, dtype=torch.int64),  # 48: 2560, 1024 bytes left
               torch.randn(750, generator=g)]  # 3000 > 1024 left: offset 0 of a second slab
    placed = [arena.place(t) for t in tensors]
    for t, h in zip(tensors, placed):
        assert h.dtype == t.dtype and h.shape == t.shape and h.is_contiguous()
        assert torch.equal(h.contiguous().view(torch.uint8), t.contiguous().view(torch.uint8))
    first, second = (s.untyped_storage().data_ptr() for s in arena.slabs)
    where = [(h.untyped_storage().data_ptr(), h.data_ptr() - h.untyped_storage().data_ptr()) for h in placed]
    assert [where[k] for k in (0, 1, 2, 3, 6, 7)] == [(first, 0), (first, 512), (first, 1024), (first, 2048),
                                                       (first, 2560), (second, 0)]
    assert where[4][0] not in (first, second) and arena.allocated == 2 * 4096 + 8000
