import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run in the interpreter on the CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

from compressor.testing import ARCHITECTURES, make_random_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """One random-weight checkpoint per supported architecture (fp32)."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_random_model(arch, root / arch) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def tiny_llama(tiny_models):
    return tiny_models["llama"]


@pytest.fixture
def registered():
    """Register test-only steps and remove them afterwards: ``registered(name)(cls)``."""
    from compressor.step import STEPS, register_step

    names = []

    def register(name):
        names.append(name)
        return register_step(name)

    yield register
    for name in names:
        STEPS.pop(name, None)


@pytest.fixture(scope="session")
def calibration_file(tmp_path_factory):
    from compressor.testing import TOKENIZER_TEXT

    path = tmp_path_factory.mktemp("text") / "calibration.txt"
    path.write_text(TOKENIZER_TEXT * 4)
    return str(path)


@pytest.fixture(scope="module")
def one_thread():
    """Single-threaded for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): small matrices gain
    nothing from threads, and on two shared cores two threads made GPTQ's tests ~20x slower (80 s against 4 s);
    the setting is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
