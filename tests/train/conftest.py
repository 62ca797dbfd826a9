import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # 2-core CI shared with other jobs: one intra-op thread avoids OpenMP oversubscription stalls
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
