"""Pipeline stages built from the same config chain to the whole model, with global parameter names."""

import torch

from hcustom_mc.model import HunyuanCustomDiT, get_model_config, initialize_weights
from hcustom_mc.model.model import split_layers
from hcustom_mc.parallel.sharding import load_full_state_dict
from tests.conftest import tiny_inputs


def test_split_layers_is_even_and_covers_everything():
    chunks = split_layers(60, 8)
    assert [len(c) for c in chunks] == [8, 8, 8, 8, 7, 7, 7, 7]
    assert [i for c in chunks for i in c] == list(range(60))


def test_stages_chain_to_the_whole_model(single_process):
    cfg = get_model_config("tiny", "audio")  # 2 double + 2 single blocks, audio after double 0 and 1
    full = HunyuanCustomDiT(cfg)
    initialize_weights(full, seed=3, zero_init=False)
    sd = full.weight_state_dict()
    inputs = tiny_inputs(cfg)
    expected = full(**inputs)
    x = None
    names = set()
    for layers in ([0], [1, 2], [3]):  # a stage boundary inside the double blocks and one at the switch
        stage = HunyuanCustomDiT(cfg, layers=range(layers[0], layers[-1] + 1))
        load_full_state_dict(stage, sd, strict=False)
        names |= set(stage.weight_state_dict())
        x = stage(**inputs, hidden=x)
    torch.testing.assert_close(x, expected, rtol=0, atol=0)
    assert names == set(sd)  # stage names are global, together exactly the whole model's

