"""bitnet.bench on tiny shapes: the functions run and return sane rows (no timing assertions)."""

import torch

from bitnet import bench
from bitnet.nn import Int8Linear, PackedBitLinear

TINY = {"tiny": dict(num_tokens=200, dim=64, depth=3, heads=4, kv_heads=2, ff_mult=2)}


def test_build_random_packed_model():
    model = bench.build_random_model(TINY["tiny"], "packed", max_seq_len=64)
    assert isinstance(model.head, Int8Linear) and isinstance(model.layers[0].ffn.down, PackedBitLinear)
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    assert int(model.layers[0].ffn.down.w_packed.max()) < 255
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 200, (1, 5)))).all()


def test_run_decode_bench_rows():
    bw = {"read_GBps": 10.0, "copy_GBps": 10.0}
    rows = bench.run_decode_bench(shapes=["tiny"], kinds=["packed", "fp32", "bf16"], layers=2, steps=2,
                                  prefill_len=8, bandwidth=bw, shape_overrides=TINY)
    assert [r["kind"] for r in rows] == ["packed", "fp32", "bf16"]
    for r in rows:
        assert r["extrapolated"] and r["timed_depth"] == 2 and r["depth"] == 3
        assert r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 and r["bound_tok_s"] > 0
        assert r["bytes_per_token"] == r["weight_bytes_per_token"] + r["kv_bytes_per_token"]
    packed, fp32, bf16 = rows
    assert packed["weight_bytes_per_token"] < bf16["weight_bytes_per_token"] < fp32["weight_bytes_per_token"]
    bench.print_decode_bench(rows, bw)


def test_kernel_bench_tiny():
    rows = bench.run_kernel_bench(batches=(1,), shapes=((16, 130),), budget_s=0.0, bf16=False)
    assert rows[0]["N"] == 16 and rows[0]["ours_min_ms"] > 0


def test_isa_bench_tiny_has_a_row_per_isa_and_peaks():
    import io

    import pytest

    from bitnet.ops import cpu as native

    if not native.available():
        pytest.skip(f"native library not built: {native.LOAD_ERROR}")
    isas = [i for i in native.supported_isas() if i != "scalar"] or ["scalar"]
    rows = bench.run_isa_bench(batches=(1, 17), shapes=((40, 300),), isas=isas, budget_s=0.0, bf16=True)
    assert [(r["M"], r["isa"]) for r in rows] == [(m, i) for m in (1, 17) for i in isas]
    for r in rows:
        assert r["gmacs"] > 0 and r["vs_bf16"] > 0
        assert (r["peak_gmacs"] > 0) == (r["isa"] != "scalar")
    out = io.StringIO()
    bench.print_isa_bench(rows, file=out)
    assert all(i in out.getvalue() for i in isas)
    assert native.isa_peak_gmacs("scalar") == 0.0


def test_peak_probes_run_first_call_then_at_most_every_interval():
    import pytest

    from bitnet.ops import cpu as native

    if not native.available():
        pytest.skip(f"native library not built: {native.LOAD_ERROR}")
    isa = native.default_isa()
    probes = bench._PeakProbes([isa], every_s=3600.0)
    calls = []
    real = probes._probe
    probes._probe = lambda i: calls.append(i) or real(i)     # the real probe, counted
    probes(); probes(); probes()
    assert calls == [isa]                                    # the first call only, within the interval
    assert (probes.best[isa] > 0) == (isa != "scalar")
    probes._every_s = 0.0
    probes()
    assert calls == [isa, isa]


def test_cli_bench_parser():
    from bitnet.cli import build_parser

    args = build_parser().parse_args(["bench", "--no-kernels", "--shapes", "small", "--layers", "1"])
    assert args.layers == 1 and args.func is not None and args.kinds == "packed,fp32,bf16"


def test_gpu_decode_benchmark_dry_run(capsys):
    """benchmarks/bench_gpu_decode.py runs end to end (tiny model on CPU, captured step traced)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu_decode.py"
    spec = importlib.util.spec_from_file_location("bench_gpu_decode", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--dry-run", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "captured" in out and "eager" in out
