"""replace_linears_in_hf on plain module trees and a real Hugging Face model."""

import pytest
import torch
from torch import nn

from bitnet import BitLinear, replace_linears_in_hf


def test_every_linear_swapped_weights_kept():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Sequential(nn.Linear(16, 4, bias=False)))
    w0, b0 = model[0].weight, model[0].bias
    assert replace_linears_in_hf(model) is model
    assert isinstance(model[0], BitLinear) and isinstance(model[2][0], BitLinear)
    assert model[0].weight is w0 and model[0].bias is b0 and model[2][0].bias is None
    assert model(torch.randn(3, 8)).shape == (3, 4)


def test_exclude_and_filter_fn():
    model = nn.ModuleDict({"body": nn.Linear(8, 8), "head": nn.Linear(8, 2), "tiny": nn.Linear(2, 2)})
    replace_linears_in_hf(model, exclude=["head"], filter_fn=lambda m, name: m.in_features >= 8)
    assert isinstance(model["body"], BitLinear)
    assert type(model["head"]) is nn.Linear and type(model["tiny"]) is nn.Linear


def test_bert_sequence_classification():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, num_labels=3)
    model = transformers.BertForSequenceClassification(config)
    n_linear = sum(type(m) is nn.Linear for m in model.modules())
    replace_linears_in_hf(model)
    assert sum(isinstance(m, BitLinear) for m in model.modules()) == n_linear
    assert not any(type(m) is nn.Linear for m in model.modules())
    out = model(input_ids=torch.randint(0, 100, (2, 7)), labels=torch.tensor([0, 2]))
    out.loss.backward()
    assert out.logits.shape == (2, 3)
    assert model.classifier.weight.grad is not None


def test_not_a_module():
    with pytest.raises(TypeError, match="model must be"):
        replace_linears_in_hf("bert")
