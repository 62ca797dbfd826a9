"""Checkpoints: safetensors round trips, tied weights, atomic saves, .pth state dicts, clear errors."""

import json

import pytest
import torch

import bitnet
from bitnet.io import CheckpointError, load_model, load_optimizer, save_checkpoint, save_optimizer


def tiny(**kw):
    torch.manual_seed(0)
    cfg = dict(num_tokens=64, dim=32, depth=2, heads=4, kv_heads=2, max_seq_len=16)
    cfg.update(kw)
    return bitnet.BitNetTransformer(**cfg).eval()


def same_logits(a, b):
    x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return torch.equal(a(x), b(x))


@pytest.mark.parametrize("tie", [False, True])
def test_checkpoint_round_trip(tmp_path, tie):
    model = tiny(tie_embeddings=tie, weights="1")
    save_checkpoint(tmp_path / "run", model, train_state={"step": 3})
    for path in (tmp_path / "run", tmp_path / "run" / "model.safetensors"):
        loaded = load_model(path)
        assert loaded.config == model.config
        assert same_logits(model, loaded)
        if tie:
            assert loaded.head.weight is loaded.embed.weight
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["train_state"]["step"] == 3 and cfg["model_config"]["weights"] == "1"


def test_safetensors_file_alone_uses_its_metadata(tmp_path):
    model = tiny(weights="fp")
    save_checkpoint(tmp_path, model)
    (tmp_path / "config.json").unlink()
    loaded = load_model(tmp_path / "model.safetensors")
    assert loaded.config["weights"] == "fp" and same_logits(model, loaded)


def test_atomic_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    import safetensors.torch

    old = tiny()
    save_checkpoint(tmp_path, old)
    before = sorted(p.name for p in tmp_path.iterdir())

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00partial")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    new = tiny()
    torch.nn.init.zeros_(new.embed.weight)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(tmp_path, new)
    assert sorted(p.name for p in tmp_path.iterdir()) == before          # no temp files left behind
    assert same_logits(old, load_model(tmp_path))


def test_missing_and_corrupt_paths_are_named(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_model(missing)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        load_model(bad)
    bad_pth = tmp_path / "bad.pth"
    bad_pth.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="bad.pth"):
        load_model(bad_pth)
    empty = tmp_path / "emptydir"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="emptydir"):
        load_model(empty)


def test_wrong_keys_and_shapes_name_the_tensor(tmp_path):
    model = tiny()
    sd = model.state_dict()
    sd.pop("layers.1.ffn.down.weight")
    torch.save(sd, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="layers.1.ffn.down.weight"):
        load_model(tmp_path / "missing.pth", heads=4)
    save_checkpoint(tmp_path / "run", model)
    with pytest.raises(CheckpointError, match="embed.weight"):
        load_model(tmp_path / "run", num_tokens=65)


def test_pth_state_dict_infers_shape(tmp_path):
    model = tiny(ff_mult=3)
    torch.save(model.state_dict(), tmp_path / "model.pth")
    loaded = load_model(tmp_path / "model.pth", heads=4, max_seq_len=16)
    assert same_logits(model, loaded)
    assert {k: loaded.config[k] for k in ("num_tokens", "dim", "depth", "heads", "kv_heads")} == \
        dict(num_tokens=64, dim=32, depth=2, heads=4, kv_heads=2)
    assert int(loaded.config["dim"] * loaded.config["ff_mult"]) == 96
    with pytest.warns(UserWarning, match="heads"):                           # heads guessed, with a warning
        guessed = load_model(tmp_path / "model.pth")
    assert guessed.config["dim"] % guessed.config["heads"] == 0
    torch.save({"model": {"module." + k: v for k, v in model.state_dict().items()}}, tmp_path / "wrapped.pt")
    assert same_logits(model, load_model(tmp_path / "wrapped.pt", heads=4))


def test_pth_reads_weights_only(tmp_path):
    torch.save(tiny(), tmp_path / "pickled.pth")                             # a whole pickled module
    with pytest.raises(CheckpointError, match="weights_only"):
        load_model(tmp_path / "pickled.pth")


def test_optimizer_round_trip(tmp_path):
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    model.loss(torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8))).backward()
    opt.step()
    save_optimizer(opt, tmp_path / "opt.safetensors", extra_tensors={"torch": torch.get_rng_state()})
    opt2 = torch.optim.AdamW(model.parameters(), lr=5.0)
    extras = load_optimizer(opt2, tmp_path / "opt.safetensors")
    assert torch.equal(extras["torch"], torch.get_rng_state())
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"][0]["lr"] == b["param_groups"][0]["lr"] == 1e-3
    assert tuple(b["param_groups"][0]["betas"]) == (0.9, 0.95)
    for i in a["state"]:
        for k in a["state"][i]:
            assert torch.equal(a["state"][i][k], b["state"][i][k])
