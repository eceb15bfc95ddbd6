import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)
