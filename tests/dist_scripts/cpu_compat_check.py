"""megatron-core machinery on CPU/gloo with the compatibility layer, checked against plain PyTorch.

usage: torchrun --nproc_per_node 2 cpu_compat_check.py {pipeline,ddp,checkpoint,sequence} [TMPDIR]

pipeline:   a 4-layer MLP on 2 stages with the 1F1B schedule and with 2 virtual stages per rank
            (interleaved): loss and every gradient equal a plain single-process autograd run.
ddp:        megatron DDP + DistributedOptimizer (ZeRO-1) on DP=2, 3 Adam steps with clipping, vs
            torch.optim.Adam on the full batch in one process.
checkpoint: dist_checkpointing save of TP=2 ColumnParallelLinear weights plus distributed optimizer
            state, load back at TP=2 (model + optimizer equal) and at TP=1 x DP=2 (weights resharded).
sequence:   megatron's sequence-parallel collectives at TP=2 (all_gather_into_tensor, reduce_scatter_tensor,
            sync and async): the SP region mappings, and a ColumnParallelLinear -> RowParallelLinear pair
            with sequence_parallel=True, forward and backward, vs the plain MLP on the whole sequence.
"""

import sys

import torch
import torch.distributed as dist

from hcustom_mc.parallel.config import ParallelConfig
from hcustom_mc.parallel.state import destroy_parallel, initialize_parallel

WIDTH, LAYERS, MICRO, MBS = 8, 4, 4, 2


def transformer_config(pp=1, tp=1, vpp=None):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=LAYERS, hidden_size=WIDTH, num_attention_heads=2,
                             tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                             virtual_pipeline_model_parallel_size=vpp,
                             pipeline_dtype=torch.float32, use_cpu_initialization=True)


def reference_layers():
    torch.manual_seed(0)
    return [torch.nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)]


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(MBS, WIDTH, generator=g), torch.randn(MBS, WIDTH, generator=g)) for _ in range(MICRO)]


def make_chunk(layers, first, config):
    """Consecutive layers of the reference MLP; megatron's schedule feeds stage inputs via set_input_tensor."""
    from megatron.core.enums import ModelType
    from megatron.core.transformer.module import MegatronModule

    class Chunk(MegatronModule):
        def __init__(self):
            super().__init__(config)
            self.layers = torch.nn.ModuleList(layers)
            self.first, self.input_tensor = first, None
            self.model_type = ModelType.encoder_or_decoder

        def set_input_tensor(self, tensor):
            self.input_tensor = tensor[0] if isinstance(tensor, list) else tensor

        def forward(self, x):
            # Pipeline tensors are [seq, micro batch, hidden]; seq is 1 here.
            h = x.unsqueeze(0) if self.first else self.input_tensor
            for layer in self.layers:
                h = torch.tanh(layer(h))
            return h

    return Chunk()


def check_pipeline(vpp):
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    info = initialize_parallel(ParallelConfig(pipeline_parallel=2, virtual_pipeline_parallel=vpp))
    ref = reference_layers()
    data = batches()
    # Reference: the whole MLP, mean of per-micro-batch losses.
    loss_ref = sum((_ref_forward(ref, x) - y).pow(2).mean() for x, y in data) / MICRO
    loss_ref.backward()

    chunks = vpp or 1
    per_chunk = LAYERS // (2 * chunks)
    config = transformer_config(pp=2, vpp=vpp)
    model = []
    for v in range(chunks):
        index = v * 2 + info.pp_rank  # megatron's interleaved order: chunk v of rank r
        layers = [torch.nn.Linear(WIDTH, WIDTH) for _ in range(per_chunk)]
        for mine, theirs in zip(layers, ref[index * per_chunk:(index + 1) * per_chunk]):
            mine.load_state_dict(theirs.state_dict())
        model.append(make_chunk(layers, first=index == 0, config=config))

    it = iter(data)
    targets = []

    def forward_step(data_iterator, chunk):
        x, y = next(data_iterator)
        targets.append(y)
        out = chunk(x)
        return out, lambda o, y=y: ((o.squeeze(0) - y).pow(2).mean(), {"loss": (o.squeeze(0) - y).pow(2).mean().detach()})

    iters = [iter(data) for _ in range(chunks)] if vpp else it
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iters, model=model if vpp else model[0],
        num_microbatches=MICRO, seq_length=1, micro_batch_size=MBS, forward_only=False)
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        loss = sum(l["loss"] for l in losses) / MICRO
        assert torch.allclose(loss, loss_ref.detach(), atol=1e-6), (loss, loss_ref)
    for v, chunk in enumerate(model):
        index = v * 2 + info.pp_rank
        for mine, theirs in zip(chunk.layers, ref[index * per_chunk:(index + 1) * per_chunk]):
            for a, b in ((mine.weight, theirs.weight), (mine.bias, theirs.bias)):
                assert torch.allclose(a.grad, b.grad, atol=1e-6), (index, (a.grad - b.grad).abs().max())
    return "pipeline vpp=%s OK" % vpp


def _ref_forward(layers, x):
    h = x
    for layer in layers:
        h = torch.tanh(layer(h))
    return h


def check_ddp():
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.module import MegatronModule

    info = initialize_parallel(ParallelConfig())
    assert info.dp_size == 2
    config = transformer_config()

    class Net(MegatronModule):
        def __init__(self):
            super().__init__(config)
            self.layers = torch.nn.ModuleList(reference_layers())

        def forward(self, x):
            return _ref_forward(self.layers, x)

    net = Net()
    ref = reference_layers()
    ref_opt = torch.optim.Adam([p for l in ref for p in l.parameters()], lr=1e-2)
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(use_distributed_optimizer=True,
                                                                        grad_reduce_in_fp32=True), net)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.0, clip_grad=0.5,
                                                 use_distributed_optimizer=True), [ddp])
    for step in range(3):
        x, y = batches()[step]
        x, y = torch.cat([x, x.flip(0)]), torch.cat([y, y.flip(0) * 2])  # full batch of 4, 2 per rank
        ref_opt.zero_grad()
        (_ref_forward(ref, x) - y).pow(2).mean().backward()
        ref_norm = torch.nn.utils.clip_grad_norm_([p for l in ref for p in l.parameters()], 0.5)
        ref_opt.step()

        ddp.zero_grad_buffer()
        opt.zero_grad()
        mine = slice(info.dp_rank * 2, info.dp_rank * 2 + 2)
        (ddp(x[mine]) - y[mine]).pow(2).mean().backward()
        ddp.finish_grad_sync()
        ok, norm, _ = opt.step()
        assert ok and abs(norm - ref_norm.item()) < 1e-5, (norm, ref_norm)
        for a, b in zip(net.layers, ref):
            assert torch.allclose(a.weight, b.weight, atol=1e-6), (step, (a.weight - b.weight).abs().max())
    return "ddp OK"


def check_checkpoint(tmp):
    from megatron.core import dist_checkpointing
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer.module import MegatronModule

    full = torch.randn(2 * WIDTH, WIDTH, generator=torch.Generator().manual_seed(5))

    def build(tp):
        config = transformer_config(tp=tp)

        class Net(MegatronModule):
            def __init__(self):
                super().__init__(config)
                self.proj = ColumnParallelLinear(WIDTH, 2 * WIDTH, config=config, init_method=lambda w: None,
                                                 bias=False, gather_output=False)

            def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
                from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

                return make_sharded_tensors_for_checkpoint(self.state_dict(prefix="", keep_vars=True), prefix,
                                                           {"proj.weight": 0}, sharded_offsets)

        return Net()

    # Save at TP=2 with distributed-optimizer state after one step.
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    info = initialize_parallel(ParallelConfig(tensor_parallel=2))
    net = build(2)
    with torch.no_grad():
        net.proj.weight.copy_(full.chunk(2)[info.tp_rank])
    ddp = DistributedDataParallel(net.config, DistributedDataParallelConfig(use_distributed_optimizer=True), net)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, use_distributed_optimizer=True), [ddp])
    ddp.zero_grad_buffer()
    net.proj(torch.ones(1, 1, WIDTH))[0].sum().backward()
    ddp.finish_grad_sync()
    opt.step()
    weight_after = net.proj.weight.detach().clone()
    model_sd = net.sharded_state_dict()
    meta = {"distrib_optim_sharding_type": "fully_reshardable"}  # the TP/PP-reshardable layout
    state = {"model": model_sd, "optimizer": opt.sharded_state_dict(model_sd, metadata=meta)}
    dist_checkpointing.save(state, tmp)
    exp_avg = {k: v.clone() for k, v in opt.optimizer.state[opt.optimizer.param_groups[0]["params"][0]].items()}

    # Load at the same layout: weights and Adam moments come back.
    net2 = build(2)
    ddp2 = DistributedDataParallel(net2.config, DistributedDataParallelConfig(use_distributed_optimizer=True), net2)
    opt2 = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, use_distributed_optimizer=True), [ddp2])
    sd2 = net2.sharded_state_dict()
    for inner in getattr(opt2, "chained_optimizers", [opt2]):  # torch Adam (no TE/apex) needs state to exist
        inner._init_optimizer_states_with_dummy_values()
    loaded = dist_checkpointing.load({"model": sd2, "optimizer": opt2.sharded_state_dict(sd2, is_loading=True, metadata=meta)}, tmp)
    net2.load_state_dict(loaded["model"])
    opt2.load_state_dict(loaded["optimizer"])
    assert torch.equal(net2.proj.weight, weight_after)
    state2 = opt2.optimizer.state[opt2.optimizer.param_groups[0]["params"][0]]
    for k in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(state2[k], exp_avg[k]), k

    # Load at TP=1 (x DP=2): the full weight is reassembled from the two shards.
    initialize_parallel(ParallelConfig(tensor_parallel=1))
    net3 = build(1)
    loaded = dist_checkpointing.load({"model": net3.sharded_state_dict()}, tmp)
    net3.load_state_dict(loaded["model"])
    gathered = [torch.empty_like(weight_after) for _ in range(2)]
    dist.all_gather(gathered, weight_after)  # both ranks' TP shards from the first layout
    assert torch.equal(net3.proj.weight, torch.cat(gathered)), "resharded weight differs"
    return "checkpoint OK"


def check_sequence():
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.tensor_parallel.mappings import (gather_from_sequence_parallel_region,
                                                        reduce_scatter_to_sequence_parallel_region,
                                                        scatter_to_sequence_parallel_region)
    from megatron.core.transformer.transformer_config import TransformerConfig

    info = initialize_parallel(ParallelConfig(tensor_parallel=2, sequence_parallel=True))
    r, S, B = info.tp_rank, 6, 2
    g = torch.Generator().manual_seed(3)
    x = torch.randn(S, B, WIDTH, generator=g)
    w1, b1 = torch.randn(2 * WIDTH, WIDTH, generator=g), torch.randn(2 * WIDTH, generator=g)
    w2, b2 = torch.randn(WIDTH, 2 * WIDTH, generator=g), torch.randn(WIDTH, generator=g)
    rows = slice(r * S // 2, (r + 1) * S // 2)
    # the region mappings: scatter / gather are inverse, reduce-scatter sums then splits
    local = scatter_to_sequence_parallel_region(x)
    assert torch.equal(local, x[rows])
    assert torch.equal(gather_from_sequence_parallel_region(local), x)
    assert torch.equal(reduce_scatter_to_sequence_parallel_region(x * (r + 1)), 3 * x[rows])
    # column (all-gather in, sharded out) -> row (reduce-scatter out), as in a DiT block
    config = TransformerConfig(num_layers=1, hidden_size=WIDTH, num_attention_heads=2, tensor_model_parallel_size=2,
                               sequence_parallel=True, use_cpu_initialization=True)
    fc1 = ColumnParallelLinear(WIDTH, 2 * WIDTH, config=config, init_method=lambda w: None, bias=True,
                               gather_output=False)
    fc2 = RowParallelLinear(2 * WIDTH, WIDTH, config=config, init_method=lambda w: None, bias=True,
                            input_is_parallel=True, skip_bias_add=False)
    cols = slice(r * WIDTH, (r + 1) * WIDTH)
    with torch.no_grad():
        fc1.weight.copy_(w1[cols]), fc1.bias.copy_(b1[cols]), fc2.weight.copy_(w2[:, cols]), fc2.bias.copy_(b2)
    xl = x[rows].clone().requires_grad_(True)
    out = fc2(torch.tanh(fc1(xl)[0]))[0]
    (out ** 2).sum().backward()
    # the one-process reference in fp64: megatron-core 0.19 sums the sharded products in another order than 0.16,
    # so the two fp32 results no longer round alike; each must be within the project's fp32 parity tolerance (1e-5
    # relative, as the training parity tests) of the exact result
    FP32_PARITY = dict(rtol=1e-5, atol=1e-5)
    xr = x.double().requires_grad_(True)
    ref_w = [t.double().requires_grad_(True) for t in (w1, b1, w2, b2)]
    ref = torch.nn.functional.linear(torch.tanh(torch.nn.functional.linear(xr, ref_w[0], ref_w[1])), ref_w[2], ref_w[3])
    (ref ** 2).sum().backward()
    torch.testing.assert_close(out, ref[rows].detach().float(), **FP32_PARITY)
    torch.testing.assert_close(xl.grad, xr.grad[rows].float(), **FP32_PARITY)
    torch.testing.assert_close(fc1.weight.grad, ref_w[0].grad[cols].float(), **FP32_PARITY)
    torch.testing.assert_close(fc2.weight.grad, ref_w[2].grad[:, cols].float(), **FP32_PARITY)
    assert fc2.bias.sequence_parallel  # the partial row-bias gradient: summed over TP by finalize_model_grads
    bias_grad = fc2.bias.grad.clone()
    dist.all_reduce(bias_grad)
    torch.testing.assert_close(bias_grad, ref_w[3].grad.float(), **FP32_PARITY)
    return "sequence OK"


def main():
    what = sys.argv[1]
    if what == "pipeline":
        msgs = [check_pipeline(None), check_pipeline(2)]
    elif what == "ddp":
        msgs = [check_ddp()]
    elif what == "sequence":
        msgs = [check_sequence()]
    else:
        msgs = [check_checkpoint(sys.argv[2])]
    if dist.get_rank() == 0:
        print(*msgs)
    destroy_parallel()


if __name__ == "__main__":
    from hcustom_mc.console import exit_process

    main()
    exit_process(0)  # only reached when every check passed
