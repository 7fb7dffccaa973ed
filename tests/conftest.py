import os
import sys
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore", category=FutureWarning)

from builders import build_trio, copy_trio, tiny_chat_model  # noqa: E402


@pytest.fixture(scope="session")
def llama_trio(tmp_path_factory):
    """A sharded tiny Llama trio shared by tests that only read it."""
    return build_trio(tmp_path_factory.mktemp("llama"), "llama", sharded=True)


@pytest.fixture
def trio_copy(llama_trio, tmp_path):
    """A private copy of the Llama trio that a test may corrupt."""
    return copy_trio(llama_trio, tmp_path / "inputs")


@pytest.fixture(scope="session")
def chat_models(tmp_path_factory):
    """Tiny chat models shared by the evaluation tests: one trained to refuse every prompt, one
    untrained, one without a chat template."""
    root = tmp_path_factory.mktemp("chat")
    return {
        "refuser": tiny_chat_model(root / "refuser", refuse_everything=True),
        "random": tiny_chat_model(root / "random"),
        "plain": tiny_chat_model(root / "plain", chat_template=False),
        "root": root,
    }
