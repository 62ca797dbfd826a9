"""``import bitnet.hf`` registers BitLlama with transformers' Auto classes directly (no import hook), in a
fresh interpreter, offline, whatever was imported before it."""

import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("transformers")

SAVE = """
import torch
from bitnet.hf import BitLlamaConfig, BitLlamaForCausalLM
torch.manual_seed(0)
config = BitLlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
model = BitLlamaForCausalLM(config).eval()
model.save_pretrained({folder!r})
torch.save(model(torch.arange(3, 12)[None]).logits, {folder!r} + "/logits.pt")
"""

LOAD = """
import sys
{first}
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from bitnet.hf.auto import registered
assert registered(), "import bitnet.hf did not register BitLlama"
assert not any(type(f).__module__.startswith("bitnet") for f in sys.meta_path), sys.meta_path
from bitnet.hf import BitLlamaConfig, BitLlamaForCausalLM
assert isinstance(AutoConfig.for_model("bitllama"), BitLlamaConfig)
assert type(AutoConfig.from_pretrained({folder!r})) is BitLlamaConfig
model = AutoModelForCausalLM.from_pretrained({folder!r}).eval()
assert type(model) is BitLlamaForCausalLM, type(model)
ref = torch.load({folder!r} + "/logits.pt", weights_only=True)
torch.testing.assert_close(model(torch.arange(3, 12)[None]).logits, ref)
print("ok")
"""


def run(code: str, tmp_path) -> str:
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"),
           "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip()


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bitllama")
    run(SAVE.format(folder=str(folder)), folder)
    return folder


@pytest.mark.parametrize("first", [
    "import bitnet.hf",                                                      # bitnet first
    "import transformers.models.auto.modeling_auto; import bitnet.hf",       # transformers' Auto classes first
])
def test_import_bitnet_hf_registers_the_auto_classes(saved_folder, tmp_path, first):
    assert run(LOAD.format(first=first, folder=str(saved_folder)), tmp_path) == "ok"


def test_plain_import_bitnet_leaves_transformers_alone_until_an_hf_name_is_used(tmp_path):
    code = """
    import sys, bitnet
    assert "bitnet.hf" not in sys.modules and "transformers" not in sys.modules
    config_class = bitnet.BitLlamaConfig                   # the lazy name imports bitnet.hf: registered
    from bitnet.hf.auto import registered
    assert registered() and "bitnet.hf" in sys.modules
    print("ok")
    """
    assert run(code, tmp_path) == "ok"
