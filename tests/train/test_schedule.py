import pytest

from bitnet.train import TwoStageSchedule


def test_two_stage_schedule_shape():
    s = TwoStageSchedule(1e-3, 100, warmup_steps=10, split=0.5, stage2_ratio=0.4, min_ratio=0.02, weight_decay=0.1)
    lrs = [s.lr(i) for i in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))               # warmup rises
    assert all(v == 1e-3 for v in lrs[10:50])                               # stage 1: peak
    assert lrs[50] == pytest.approx(4e-4)                                   # sudden drop
    assert all(a >= b for a, b in zip(lrs[50:], lrs[51:]))                  # stage 2 decays
    assert lrs[-1] >= 2e-5 and s.lr(100) == pytest.approx(2e-5)
    assert [s.wd(i) for i in (0, 49, 50, 99)] == [0.1, 0.1, 0.0, 0.0]
    with pytest.raises(ValueError, match="warmup_steps"):
        TwoStageSchedule(1e-3, 10, warmup_steps=20)
