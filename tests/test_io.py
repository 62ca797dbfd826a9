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


# ------------------------------------------------------------------------------------------- bad files

def saved_run(tmp_path, **kw):
    run = tmp_path / "run"
    save_checkpoint(run, tiny(**kw))
    return run


def edit_config(run, **fields):
    cfg = json.loads((run / "config.json").read_text())
    for key, value in fields.items():
        target = cfg
        *parents, last = key.split(".")
        for p in parents:
            target = target[p]
        target[last] = value
    (run / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("name", ["../elsewhere/x.safetensors", "/abs/x.safetensors", "sub/../../x.safetensors"])
def test_files_named_by_a_config_stay_inside_its_folder(tmp_path, name):
    run = saved_run(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (run / "model.safetensors").rename(elsewhere / "x.safetensors")   # the file exists, but outside
    edit_config(run, **{"files.model": name})
    with pytest.raises(CheckpointError, match=r"config\.json.*files\.model.*outside"):
        load_model(run)


def test_files_inside_the_folder_and_links_in_it_still_load(tmp_path):
    run = saved_run(tmp_path)
    (run / "weights").mkdir()
    (run / "model.safetensors").rename(run / "weights" / "m.safetensors")
    edit_config(run, **{"files.model": "weights/m.safetensors"})
    load_model(run)


def _child_with_memory_limit(fn, extra_bytes: int) -> str:
    """Run ``fn()`` in a forked child whose address space may grow by ``extra_bytes`` only; returns what it
    raised ('CheckpointError: ...', 'RuntimeError: ...', 'ok'), so that a huge allocation fails in the child
    instead of taking the machine's memory."""
    import os
    import resource

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            vm = int(next(ln for ln in open("/proc/self/status") if ln.startswith("VmSize")).split()[1]) * 1024
            resource.setrlimit(resource.RLIMIT_AS, (vm + extra_bytes, resource.RLIM_INFINITY))
            try:
                fn()
                msg = "ok"
            except BaseException as e:  # noqa: BLE001 - reported to the parent
                msg = f"{type(e).__name__}: {e}"
            os.write(w, msg.encode()[:4000])
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        msg = f.read()
    os.waitpid(pid, 0)
    return msg


@pytest.mark.skipif(not hasattr(__import__("os"), "fork") or not __import__("os").path.exists("/proc/self/status"),
                    reason="needs fork and /proc (Linux)")
@pytest.mark.parametrize("field, value, pattern", [
    ("dim", 131072, r"model_config\.dim=131072 does not match .*embed\.weight has 32 columns"),
    ("num_tokens", 10 ** 9, r"model_config\.num_tokens=1000000000 does not match"),
    ("depth", 4000, r"model_config\.depth=4000 does not match"),
    ("max_seq_len", 10 ** 9, r"model_config\.max_seq_len must be an integer in \[1, 1048576\]"),
    ("max_seq_len", 1e9, r"model_config\.max_seq_len must be an integer"),
])
def test_huge_config_sizes_fail_before_any_allocation(tmp_path, field, value, pattern):
    run = saved_run(tmp_path)
    edit_config(run, **{f"model_config.{field}": value})
    msg = _child_with_memory_limit(lambda: load_model(run), extra_bytes=1 << 30)
    assert msg.startswith("CheckpointError") and "config.json" in msg, msg
    assert __import__("re").search(pattern, msg), msg


@pytest.mark.parametrize("field, value, pattern", [
    ("kv_heads", 4, r"model_config\.kv_heads=4 does not match .*k_proj"),
    ("ff_mult", 2, r"model_config\.ff_mult=2 does not match"),
    ("tie_embeddings", True, r"model_config\.tie_embeddings=True does not match .*head\.weight"),
    ("heads", 3, r"model_config\.heads=3 must divide dim=32"),
    ("weights", "2bit", r"model_config\.weights must be one of"),
    ("activation", 7, r"model_config\.activation must be one of"),
    ("bits", "8", r"model_config\.bits must be an integer in 2\.\.8"),
    ("surprise", 1, r"model_config\.surprise is not a BitNetTransformer argument"),
])
def test_config_fields_are_checked_against_the_tensors(tmp_path, field, value, pattern):
    run = saved_run(tmp_path)
    edit_config(run, **{f"model_config.{field}": value})
    with pytest.raises(CheckpointError, match=pattern) as e:
        load_model(run)
    assert "config.json" in str(e.value)


@pytest.mark.parametrize("value", [None, "abc", [1, 2], 5])
def test_model_config_that_is_no_object_is_named(tmp_path, value):
    run = saved_run(tmp_path)
    edit_config(run, model_config=value)
    with pytest.raises(CheckpointError, match=r"config\.json: model_config must be a JSON object"):
        load_model(run)


@pytest.mark.parametrize("meta, pattern", [
    ({"bitnet.aliases": "{not json"}, r"metadata 'bitnet\.aliases' is not JSON"),
    ({"bitnet.aliases": "[1, 2]"}, r"metadata 'bitnet\.aliases' must map tensor names"),
    ({"bitnet.config": "garbage"}, r"metadata 'bitnet\.config'.* is not JSON"),
    ({"bitnet.config": "\"abc\""}, r"metadata 'bitnet\.config'.*model_config must be a JSON object"),
])
def test_garbage_metadata_is_named(tmp_path, meta, pattern):
    from safetensors.torch import save_file

    model = tiny()
    path = tmp_path / "m.safetensors"
    save_file(dict(model.state_dict()), str(path), metadata={"bitnet.config": json.dumps(model.config), **meta})
    with pytest.raises(CheckpointError, match=pattern) as e:
        load_model(path)
    assert "m.safetensors" in str(e.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_a_load_error(tmp_path, bad):
    model = tiny()
    with torch.no_grad():
        model.layers[1].attn.q_proj.weight[3, 4] = bad
    save_checkpoint(tmp_path / "run", model)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*'layers\.1\.attn\.q_proj\.weight' holds NaN"):
        load_model(tmp_path / "run")
    torch.save(model.state_dict(), tmp_path / "sd.pth")
    with pytest.raises(CheckpointError, match=r"sd\.pth.*layers\.1\.attn\.q_proj\.weight"):
        load_model(tmp_path / "sd.pth", heads=4)


def test_packed_checkpoints_refuse_code_3_nan_scales_and_bad_base3(tmp_path):
    from safetensors.torch import load_file, save_file

    from bitnet.convert.pack import pack

    model = pack(tiny())
    save_checkpoint(tmp_path / "run", model)
    path = tmp_path / "run" / "model.safetensors"
    good = load_file(str(path))
    meta = __import__("safetensors").safe_open(str(path), "pt").metadata()
    assert same_logits(model, load_model(tmp_path / "run"))

    codes3 = dict(good)
    codes3["layers.0.ffn.down.w_packed"] = codes3["layers.0.ffn.down.w_packed"].clone()
    codes3["layers.0.ffn.down.w_packed"][2, 5] = 0b11_01_01_01          # one 2-bit field holds code 3
    save_file(codes3, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*'layers\.0\.ffn\.down\.w_packed'.*code 3"):
        load_model(tmp_path / "run")

    nan_scale = dict(good)
    nan_scale["layers.1.attn.out_proj.w_scale"] = torch.tensor(float("nan"))
    save_file(nan_scale, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match=r"'layers\.1\.attn\.out_proj\.w_scale' holds NaN"):
        load_model(tmp_path / "run")

    save_checkpoint(tmp_path / "compact", model, compact=True)
    cpath = tmp_path / "compact" / "model.safetensors"
    ctensors = load_file(str(cpath))
    cmeta = __import__("safetensors").safe_open(str(cpath), "pt").metadata()
    name = next(k for k in ctensors if k.endswith(".w_base3"))
    ctensors[name] = ctensors[name].clone()
    ctensors[name][0] = 250                                          # > 242: no group of five trits
    save_file(ctensors, str(cpath), metadata=cmeta)
    with pytest.raises(CheckpointError, match=r"compact/model\.safetensors.*242"):
        load_model(tmp_path / "compact")
    cmeta["bitnet.compact"] = "[garbage"
    save_file(load_file(str(cpath)), str(cpath), metadata=cmeta)
    with pytest.raises(CheckpointError, match=r"metadata 'bitnet\.compact'"):
        load_model(tmp_path / "compact")


@pytest.mark.parametrize("payload, pattern", [
    ([1, 2, 3], "does not hold a state dict of tensors"),
    ({}, "does not hold a state dict of tensors"),
    ({"embed.weight": "text"}, "does not hold a state dict of tensors"),
    ({1: torch.zeros(2)}, "does not hold a state dict of tensors"),
    ({"embed.weight": torch.zeros(3)}, "not a matrix"),
    ({"embed.weight": torch.zeros(4, 8)}, "no 'layers.N"),
])
def test_bad_pth_state_dicts_are_named(tmp_path, payload, pattern):
    path = tmp_path / "bad.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=pattern) as e:
        load_model(path, heads=2)
    assert "bad.pt" in str(e.value)


def test_truncated_files_are_named(tmp_path):
    run = saved_run(tmp_path)
    data = (run / "model.safetensors").read_bytes()
    (run / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_model(run)
    model = tiny()
    torch.save(model.state_dict(), tmp_path / "t.pth")
    raw = (tmp_path / "t.pth").read_bytes()
    (tmp_path / "t.pth").write_bytes(raw[: len(raw) // 3])
    with pytest.raises(CheckpointError, match=r"t\.pth"):
        load_model(tmp_path / "t.pth", heads=4)


def test_garbage_optimizer_metadata_is_named(tmp_path):
    from safetensors.torch import save_file

    model = tiny()
    opt = torch.optim.AdamW(model.parameters())
    save_file({"state.0.step": torch.zeros(())}, str(tmp_path / "o.safetensors"),
              metadata={"bitnet.optimizer": "{broken"})
    with pytest.raises(CheckpointError, match=r"o\.safetensors: metadata 'bitnet\.optimizer'"):
        load_optimizer(opt, tmp_path / "o.safetensors")
    save_file({"state.x.step": torch.zeros(())}, str(tmp_path / "o.safetensors"), metadata={
        "bitnet.optimizer": json.dumps({"type": "AdamW", "param_groups": [], "scalars": {}})})
    with pytest.raises(CheckpointError, match=r"o\.safetensors: tensor names"):
        load_optimizer(opt, tmp_path / "o.safetensors")


@pytest.mark.parametrize("tokenizer, pattern", [
    ({"type": "bytes", "special_tokens": 5}, r"tokenizer\.special_tokens must be a list"),
    ({"type": "bytes", "special_tokens": ["<eos>", "<eos>"]}, r"tokenizer\.special_tokens must be a list"),
    ({"type": "sentencepiece"}, r"tokenizer\.type must be 'bytes' or 'hf'"),
    ({"type": "hf", "name": 7}, r"tokenizer\.name must be a folder"),
    ("bytes", r"tokenizer must be a JSON object"),
])
def test_bad_tokenizer_configs_are_named(tmp_path, tokenizer, pattern):
    from bitnet.io import read_tokenizer

    run = saved_run(tmp_path)
    edit_config(run, tokenizer=tokenizer)
    with pytest.raises(ValueError, match=pattern) as e:
        read_tokenizer(run)
    assert "config.json" in str(e.value)


def test_hf_tokenizer_names_that_are_no_folder_and_broken_tokenizer_files(tmp_path):
    pytest.importorskip("transformers")
    from bitnet.io import read_tokenizer

    run = saved_run(tmp_path)
    edit_config(run, tokenizer={"type": "hf", "name": "no-such-tokenizer-folder"})
    with pytest.raises(ValueError, match=r"config\.json: tokenizer\.name: 'no-such-tokenizer-folder' is not a folder"):
        read_tokenizer(run)                                  # the HF cache only: never a download
    (run / "tok").mkdir()
    (run / "tok" / "tokenizer.json").write_text("{garbage")
    (run / "tok" / "tokenizer_config.json").write_text("{\"tokenizer_class\": \"PreTrainedTokenizerFast\"}")
    edit_config(run, tokenizer={"type": "hf", "name": "tok"})            # relative: inside the run folder
    with pytest.raises(ValueError, match=r"config\.json: tokenizer\.name: the folder .*tok holds no readable"):
        read_tokenizer(run)


@pytest.mark.parametrize("field, value", [("train_state", [1]), ("files", "model.safetensors"),
                                          ("checkpoint", {"id": 5}), ("files", {"model": 3})])
def test_other_config_fields_are_type_checked(tmp_path, field, value):
    from bitnet.io import read_config

    run = saved_run(tmp_path)
    edit_config(run, **{field: value})
    with pytest.raises(CheckpointError, match=rf"config\.json: {field}"):
        read_config(run)


def test_save_ids_tie_the_files_to_config_json(tmp_path):
    from bitnet.io import CHECKPOINT_ID_KEY, file_checkpoint_id

    run = saved_run(tmp_path)
    cfg = json.loads((run / "config.json").read_text())
    assert file_checkpoint_id(run / "model.safetensors") == cfg["checkpoint"]["id"]
    first = cfg["checkpoint"]["id"]
    save_checkpoint(run, tiny())
    assert json.loads((run / "config.json").read_text())["checkpoint"]["id"] not in (first, None)
    assert CHECKPOINT_ID_KEY == "bitnet.checkpoint_id"
