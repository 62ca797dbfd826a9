"""benchmarks/bench_batched_decode.py runs end to end and rejects bad arguments with a clear error."""

import importlib.util
from pathlib import Path

import pytest

from bitnet.ops import cpu as native


def _load():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_batched_decode.py"
    spec = importlib.util.spec_from_file_location("bench_batched_decode", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(not native.available(), reason=f"native library not built: {native.LOAD_ERROR}")
def test_batched_decode_bench_prints_a_row_per_batch(capsys):
    mod = _load()
    assert mod.main(["--shapes", "load", "--batches", "1,3", "--pos", "5", "--budget", "0", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "ISA" in out and "load: dim 1024, 12 layers" in out
    rows = [[c.split() for c in line.split("|")] for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [r[0] for r in rows] == [["1"], ["3"]]
    # per dtype (float32, float16, int8): ms/step, tok/s, x vs B=1, KV MB; then float16 / float32, int8 / float32
    assert all(len(r) == 6 and len(r[1]) == len(r[2]) == len(r[3]) == 4 for r in rows)
    assert float(rows[0][1][2]) == float(rows[0][2][2]) == float(rows[0][3][2]) == 1.0
    assert all(float(r[1][0]) > 0 for r in rows)
    assert float(rows[1][1][3]) == 2 * float(rows[1][2][3]) > 0            # float16 caches: half the bytes
    assert float(rows[1][2][3]) / 2 < float(rows[1][3][3]) < float(rows[1][2][3])   # int8: a quarter + scales
    assert "float16/float32 tok/s" in out and "int8/float32 tok/s" in out and float(rows[1][5][0]) > 0


@pytest.mark.skipif(not native.available(), reason=f"native library not built: {native.LOAD_ERROR}")
def test_batched_decode_bench_one_kv_dtype(capsys):
    mod = _load()
    assert mod.main(["--shapes", "load", "--batches", "2", "--pos", "3", "--budget", "0", "--threads", "1",
                     "--kv-dtype", "float16"]) == 0
    out = capsys.readouterr().out
    assert "float16 ms/step" in out and "float32" not in out.split("load: dim")[1]


def test_batched_decode_bench_rejects_bad_arguments(capsys):
    mod = _load()
    with pytest.raises(SystemExit):
        mod.main(["--shapes", "huge"])
    assert "unknown shape 'huge'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        mod.main(["--batches", "0,2"])
    assert "positive integers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        mod.main(["--kv-dtype", "float32,bf16"])
    assert "--kv-dtype: expected comma-separated KV-cache dtypes of float32, float16, int8, got 'float32,bf16'" in \
        capsys.readouterr().err
