"""``bitnet.load``: every MODEL kind, on checkpoints written by transformers' own code where it can write them,
with a real BPE tokenizer (``tokenizers``) saved as tokenizer.json + tokenizer_config.json with a chat template."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bitnet
from bitnet import BitNetTransformer, load
from bitnet.io import save_checkpoint
from bitnet.loading import ACCEPTED_FORMATS, ModelFormatError
from bitnet.tokenizer import ByteTokenizer

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

VOCAB = 320
EOT, BOS, EOS = "<|eot_id|>", "<|begin_of_text|>", "<|end_of_text|>"
TEMPLATE = ("{% for m in messages %}{% if loop.first %}{{ bos_token }}{% endif %}{{ m['role'] | capitalize }}: "
            "{{ m['content'] }}" + EOT + "{% endfor %}{% if add_generation_prompt %}Assistant: {% endif %}")
CORPUS = ["the quick brown fox jumps over the lazy dog", "hello how are you today", "user assistant system",
          "a chat about small models and their tokenizers"] * 20


@pytest.fixture(autouse=True)
def _no_dynamo():
    """transformers' BitNet layers are @torch.compile'd: run them eagerly (no C++ compile on CPU tests)."""
    with torch.compiler.set_stance("force_eager"):
        yield


def write_tokenizer(folder: Path) -> "transformers.PreTrainedTokenizerFast":
    """A byte-level BPE trained here (ids 0..2 are <|eot_id|>, <|begin_of_text|>, <|end_of_text|>), saved by
    transformers with a chat template that ends each turn with <|eot_id|>; BOS added to plain prompts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=[EOT, BOS, EOS],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 1)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS)
    fast.chat_template = TEMPLATE
    fast.save_pretrained(folder)
    assert len(fast) <= VOCAB and fast.convert_tokens_to_ids(EOT) == 0
    return fast


def write_generation_config(folder: Path, **kw) -> None:
    transformers.GenerationConfig(**{"do_sample": True, "temperature": 0.6, "top_p": 0.9, "max_new_tokens": 7,
                                     "eos_token_id": [2, 0], **kw}).save_pretrained(folder)


def bitnet_config(**kw):
    return transformers.BitNetConfig(**{
        "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
        "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, **kw})


@pytest.fixture(scope="module")
def online_folders(tmp_path_factory):
    """The 2B-4T-bf16 layout (bf16 master weights), written by transformers' own BitNetForCausalLM:
    one file, and sharded with model.safetensors.index.json (max_shard_size)."""
    torch.manual_seed(0)
    model = transformers.BitNetForCausalLM(bitnet_config()).to(torch.bfloat16).eval()
    root = tmp_path_factory.mktemp("online")
    single, sharded = root / "single", root / "sharded"
    model.save_pretrained(single)
    model.save_pretrained(sharded, max_shard_size="40KB")
    for f in (single, sharded):
        write_tokenizer(f)
        write_generation_config(f)
    assert (sharded / "model.safetensors.index.json").is_file() and not (sharded / "model.safetensors").exists()
    return single, sharded


@pytest.fixture(scope="module")
def offline_folder(online_folders, tmp_path_factory):
    """The 2B-4T layout (packed uint8 + weight_scale, quantization_mode offline), sharded; written by
    bitnet.hf.BitNetForCausalLM.save_pretrained (transformers cannot re-save a quantised BitNet model) and
    checked below to load in transformers' own BitNetForCausalLM."""
    from bitnet.hf import BitNetForCausalLM

    folder = tmp_path_factory.mktemp("offline") / "2b4t"
    BitNetForCausalLM.from_pretrained(str(online_folders[0])).save_pretrained(str(folder), max_shard_size=30_000)
    write_tokenizer(folder)
    write_generation_config(folder)
    return folder


def body_hidden(model: BitNetTransformer, ids: torch.Tensor) -> torch.Tensor:
    """The final-norm hidden states (B, T, dim) of our model, i.e. what its head reads."""
    x = model.embed(ids).float()
    for layer in model.layers:
        x = layer(x)
    return model.norm(x)


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


IDS = torch.tensor([[1, 5, 9, 33, 60, 2, 7, 100, 12, 0]])


def test_offline_official_folder_runs_packed_and_matches_transformers(offline_folder):
    ours = load(offline_folder, device="cpu")
    assert ours.kind == "hf-bitnet" and ours.packed and isinstance(ours.model, BitNetTransformer)
    assert type(ours.model.head).__name__ == "Int8Linear"
    assert ours.model.embed.weight.dtype == torch.bfloat16          # bf16 table of a bf16 checkpoint: exact
    if sys.platform.startswith("linux"):                            # ... memory-mapped from its shard file
        shard = json.loads((offline_folder / "model.safetensors.index.json").read_text())["weight_map"][
            "model.embed_tokens.weight"]
        assert str(offline_folder / shard) in Path("/proc/self/maps").read_text()
    assert ours.context_length == 64 and ours.name == "2b4t"
    theirs = transformers.BitNetForCausalLM.from_pretrained(offline_folder, dtype=torch.bfloat16)
    theirs = torch.nn.Module.float(theirs).eval()
    with torch.no_grad():
        out = theirs(IDS, output_hidden_states=True)
        assert rel(body_hidden(ours.model, IDS), out.hidden_states[-1]) < 1e-5
        logits = ours.model(IDS)
    assert rel(logits, out.logits) < 3e-2                               # int8 head
    assert (logits.argmax(-1) == out.logits.argmax(-1)).float().mean() >= 0.8


@pytest.mark.parametrize("which", ["single", "sharded"])
def test_online_bf16_folder_written_by_transformers(online_folders, which):
    from bitnet.hf import BitNetForCausalLM

    folder = online_folders[0 if which == "single" else 1]
    ours = load(folder, device="cpu")
    assert ours.kind == "hf-bitnet" and ours.packed
    reference = BitNetForCausalLM.from_pretrained(str(folder))         # the module path of the same layout
    with torch.no_grad():
        ref = reference(IDS, output_hidden_states=True).hidden_states[-1]
        assert rel(body_hidden(ours.model, IDS), ref) < 1e-5


def test_tokenizer_chat_template_generation_defaults_and_stop_ids(offline_folder):
    loaded = load(offline_folder, device="cpu")
    tok = loaded.tokenizer
    assert loaded.chat_template == TEMPLATE and tok.chat_template == TEMPLATE
    assert loaded.generation == {"temperature": 0.6, "top_p": 0.9, "max_new_tokens": 7}
    assert set(loaded.stop_ids) == {0, 2}                            # generation_config eos ids, <|eot_id|>
    assert tok.encode_prompt("hello")[0] == 1 and tok.encode("hello")[0] != 1   # BOS on plain prompts only
    from bitnet.chat import format_chat

    prompt, stops = format_chat([{"role": "user", "content": "hello"}], tok)
    assert prompt == BOS + "User: hello" + EOT + "Assistant: " and stops == ()
    assert tok.encode(prompt)[0] == 1


def test_greedy_generation_config_means_temperature_zero(tmp_path, online_folders):
    import shutil

    folder = tmp_path / "greedy"
    shutil.copytree(online_folders[0], folder)
    write_generation_config(folder, do_sample=False, temperature=None, top_p=None)
    inf = bitnet.BitNetInference(device="cpu").load_model(folder)
    assert inf.sampling["temperature"] == 0.0 and inf.sampling["top_p"] == 0.95   # top_p: our default
    assert bitnet.BitNetInference(device="cpu", temperature=0.3).load_model(folder).sampling["temperature"] == 0.3


def test_bitllama_folder_written_by_save_pretrained(tmp_path):
    from bitnet import BitLlamaConfig, BitLlamaForCausalLM

    torch.manual_seed(0)
    config = BitLlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=48,
                            hidden_act="relu2", rope_theta=5000.0)
    hf = BitLlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in hf.model.layers:                               # non-trivial sub-norm weights
            layer.self_attn.o_proj.norm.weight.uniform_(0.5, 1.5)
            layer.mlp.down_proj.norm.weight.uniform_(0.5, 1.5)
    hf.save_pretrained(tmp_path / "bitllama")
    write_tokenizer(tmp_path / "bitllama")
    fp = load(tmp_path / "bitllama", device="cpu", pack=False)
    assert fp.kind == "bitllama" and not fp.packed and fp.context_length == 48
    with torch.no_grad():
        assert rel(fp.model(IDS), hf(IDS).logits) < 1e-5
    packed = load(tmp_path / "bitllama", device="cpu")               # CPU: packed by default
    assert packed.packed and packed.stop_ids == (2, 0)               # tokenizer eos, template's <|eot_id|>
    with torch.no_grad():
        assert rel(packed.model(IDS), hf(IDS).logits) < 3e-2


def write_hub_cache(cache: Path, repo_id: str, source: Path, revision: str = "0123456789abcdef0123") -> Path:
    """``source``'s files laid out as huggingface_hub writes its cache: blobs named by their hash,
    snapshots/<revision>/<file> symlinks to them, refs/main naming the revision."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    snap = repo / "snapshots" / revision
    snap.mkdir(parents=True)
    for f in sorted(source.iterdir()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        (repo / "blobs" / digest).write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(Path("..", "..", "blobs", digest))
    return snap


def test_hub_id_from_the_local_cache_offline(offline_folder, tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    cache = tmp_path / "hub"
    snap = write_hub_cache(cache, "tiny-org/bitnet-tiny", offline_folder)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = load("tiny-org/bitnet-tiny", device="cpu")
    assert loaded.name == "tiny-org/bitnet-tiny" and loaded.kind == "hf-bitnet" and loaded.path == snap
    direct = load(offline_folder, device="cpu")
    with torch.no_grad():
        assert torch.equal(loaded.model(IDS), direct.model(IDS))
    with pytest.raises(ModelFormatError) as err:
        load("tiny-org/not-cached", device="cpu")
    assert "tiny-org/not-cached" in str(err.value) and "HF_HUB_OFFLINE" in str(err.value)


def test_hub_id_not_cached_offline_is_a_one_line_cli_error(tmp_path):
    pytest.importorskip("huggingface_hub")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "bitnet", "generate", "microsoft/bitnet-b1.58-2B-4T", "--prompt", "x"],
                          capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "microsoft/bitnet-b1.58-2B-4T" in proc.stderr and "HF_HUB_OFFLINE" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_unknown_inputs_name_the_path_and_the_accepted_formats(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelFormatError) as err:
        load(tmp_path / "notes.txt")
    assert "notes.txt" in str(err.value) and all(f in str(err.value) for f in ACCEPTED_FORMATS)
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ModelFormatError, match="model_type 'gpt2'"):
        load(gpt2)
    with pytest.raises(FileNotFoundError, match="no such file or folder") as err:
        load(tmp_path / "missing")
    assert "official BitNet layout" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFormatError, match="holds no config.json"):
        load(tmp_path / "empty")


def test_our_run_folder_packs_on_cpu(tmp_path):
    torch.manual_seed(0)
    model = BitNetTransformer(256, 32, 2, heads=4, max_seq_len=64).eval()
    run = save_checkpoint(tmp_path / "run", model, tokenizer=ByteTokenizer())
    fp = load(run, device="cpu", pack=False)
    assert not fp.packed and isinstance(fp.tokenizer, ByteTokenizer) and fp.stop_ids == ()
    packed = load(run, device="cpu")
    assert packed.packed and type(packed.model.head).__name__ == "Int8Linear"
    assert packed.model.embed.weight.dtype == torch.float32              # our fp32 tables stay fp32
    reference = bitnet.pack(BitNetTransformer(**{k: v for k, v in model.config.items()}).eval())
    reference.load_state_dict(packed.model.state_dict())
    ids = torch.tensor([list(b"hello there")])
    with torch.no_grad():
        assert torch.equal(packed.model(ids), reference(ids))
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "config.json").write_text(json.dumps({"model_type": "bitnet"}))
    with pytest.raises(ValueError, match="apply to bitnet checkpoints only"):
        load(stub, heads=2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a CPU-only torch")
def test_device_cuda_on_cpu_only_torch_is_one_line(tmp_path):
    model = BitNetTransformer(256, 16, 1, heads=2, max_seq_len=32)
    run = save_checkpoint(tmp_path / "run", model, tokenizer=ByteTokenizer())
    with pytest.raises(ValueError, match="cuda"):
        load(run, device="cuda")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for cmd in (["generate", str(run), "--prompt", "x"], ["chat", str(run)], ["eval", str(run), "--data", str(run)],
                ["serve", str(run), "--port", "0"]):
        proc = subprocess.run([sys.executable, "-m", "bitnet", *cmd, "--device", "cuda"], capture_output=True,
                              text=True, env=env, timeout=240, input="")
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "--device cpu" in proc.stderr


def test_gguf_dispatch(tmp_path):
    gguf_import = pytest.importorskip("bitnet.convert.gguf_import")
    pytest.importorskip("gguf")
    from bitnet.convert import export_gguf

    torch.manual_seed(0)
    model = BitNetTransformer(300, 256, 1, heads=4, ff_mult=2, max_seq_len=64, activation="silu",
                              tie_embeddings=True).eval()
    path = tmp_path / "tiny.gguf"
    export_gguf(model, str(path))
    loaded = load(path, device="cpu", compact_embeddings=False)
    direct, _ = gguf_import.load_gguf(str(path))
    assert loaded.kind == "gguf" and loaded.packed and loaded.name == "tiny"
    ids = torch.tensor([[1, 2, 3, 250]])
    with torch.no_grad():
        assert torch.equal(loaded.model(ids), direct.eval()(ids))


def test_int8_head_in_row_blocks_equals_the_whole_table_quantisation():
    from bitnet.loading import int8_head
    from bitnet.nn.int8_linear import Int8Linear

    lin = torch.nn.Linear(48, 1001, bias=False)
    whole, blocks = Int8Linear.from_linear(lin), int8_head(lin, rows=128)
    assert torch.equal(whole.w_int8, blocks.w_int8) and torch.equal(whole.w_scale, blocks.w_scale)
    x = torch.randn(3, 48)
    assert torch.equal(whole(x), blocks(x))


def test_pack_command_turns_an_official_folder_into_our_run_folder(offline_folder, tmp_path, capsys):
    from bitnet.cli import main

    assert main(["pack", str(offline_folder), "--out", str(tmp_path / "run")]) == 0
    assert json.loads(capsys.readouterr().out)["file_bytes"] > 0
    assert (tmp_path / "run" / "tokenizer.json").is_file() and (tmp_path / "run" / "generation_config.json").is_file()
    ours, direct = load(tmp_path / "run", device="cpu"), load(offline_folder, device="cpu")
    assert ours.kind == "bitnet" and ours.packed and ours.chat_template == TEMPLATE
    assert set(ours.stop_ids) == {0, 2} and ours.generation == direct.generation
    with torch.no_grad():
        assert torch.equal(ours.model(IDS), direct.model(IDS))          # same bytes, same logits
    assert ours.model.embed.weight.dtype == torch.bfloat16              # fp32 on disk, bf16 values: kept exactly
    assert load(tmp_path / "run", device="cpu", compact_embeddings=False).model.embed.weight.dtype == torch.float32
