import pytest
import torch
from torch import nn

from jem_ext.modules import eval_mode, model_device


@pytest.mark.parametrize("training", [True, False])
def test_eval_mode_restores_the_mode_after_the_block_and_after_an_error(training):
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)).train(training)
    with eval_mode(model):
        assert not model.training and not model[1].training
    assert model.training == training and model[1].training == training
    with pytest.raises(RuntimeError), eval_mode(model):
        raise RuntimeError("in the block")
    assert model.training == training and model[1].training == training


def test_model_device_reads_parameters_then_buffers_then_says_cpu():
    assert model_device(nn.Linear(2, 2)) == torch.device("cpu")
    assert model_device(nn.BatchNorm1d(2, affine=False)) == torch.device("cpu")
    assert model_device(nn.Identity()) == torch.device("cpu")
    meta = nn.BatchNorm1d(2, affine=False).to("meta")  # buffers only
    assert model_device(meta) == torch.device("meta")
