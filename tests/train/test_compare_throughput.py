"""`bitnet compare` prints the training tokens/s of every weight kind side by side."""

from bitnet.cli import main
from bitnet.train.compare import throughput_line


def test_throughput_line_gives_ratios_to_fp():
    rows = [{"weights": "1.58", "tokens_per_s": 900.0}, {"weights": "1", "tokens_per_s": 450.0},
            {"weights": "fp", "tokens_per_s": 1000.0}]
    assert throughput_line(rows) == "training tokens/s: b1.58 900 (0.90x fp) | b1 450 (0.45x fp) | fp 1,000"
    assert throughput_line(rows[:2]) == "training tokens/s: b1.58 900 | b1 450"      # no fp run: no ratio


def test_compare_cli_prints_tokens_per_second_per_kind(tmp_path, capsys):
    data = tmp_path / "tiny.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 100)
    assert main(["compare", "--data", str(data), "--out", str(tmp_path / "c"), "--kinds", "1.58", "1", "fp",
                 "--steps", "2", "--dim", "32", "--depth", "1", "--heads", "2", "--seq-len", "32",
                 "--batch-size", "4", "--eval-every", "0", "--eval-batches", "1", "--no-progress", "--no-plot",
                 "--device", "cpu"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("training tokens/s:"))
    assert "b1.58 " in line and "x fp)" in line and "| b1 " in line and "| fp " in line
