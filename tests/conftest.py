import numpy as np
import pytest
from click.testing import CliRunner


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(autouse=True, scope="session")
def _ghindex_cache(tmp_path_factory):
    """Backbones exported for ONNX Runtime (ghindex.runtime) go to this session's folder, not ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GHINDEX_CACHE", str(tmp_path_factory.mktemp("ghindex-cache")))
        yield
