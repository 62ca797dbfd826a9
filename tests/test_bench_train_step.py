"""benchmarks/bench_train_step.py runs end to end on a tiny shape and prints every variant with a ratio."""

import importlib.util
from pathlib import Path


def _load():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train_step.py"
    spec = importlib.util.spec_from_file_location("bench_train_step", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_train_step_benchmark_tiny_run(capsys):
    mod = _load()
    assert mod.main(["--dims", "16", "--depth", "1", "--heads", "2", "--batch", "2", "--seq", "8",
                     "--vocab", "32", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "CPU:" in out and "(a) BitNetTransformer dim 16" in out and "(b) nanoGPT-like decoder dim 16" in out
    for name in ("b1.58 ", "b1.58 (reference)", "b1 ", "fp ", "nn.Linear ", "drop-in BitLinear", "drop-in (reference)"):
        line = next(x for x in out.splitlines() if x.strip().startswith(name.strip()))
        ratios = [float(v) for v in line.split()[-4:] if v.replace(".", "").isdigit()]
        assert ratios and all(r > 0 for r in ratios), line


def test_tiny_gpt_drop_in_swaps_every_block_linear():
    mod = _load()
    from bitnet import replace_linears_in_hf
    from bitnet.convert import count_bitlinear

    model = replace_linears_in_hf(mod.TinyGPT(32, 16, 2, 2, 8), norm=True, exclude=["lm_head"])
    assert count_bitlinear(model) == 2 * 4 and type(model.lm_head).__name__ == "Linear"
