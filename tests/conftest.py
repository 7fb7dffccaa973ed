import os
import sys
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore", category=FutureWarning)

from builders import build_trio  # noqa: E402


@pytest.fixture(scope="session")
def llama_trio(tmp_path_factory):
    """A sharded tiny Llama trio shared by tests that only read it."""
    return build_trio(tmp_path_factory.mktemp("llama"), "llama", sharded=True)
