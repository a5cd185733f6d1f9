import numpy as np
import pytest
from click.testing import CliRunner


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def rng():
    return np.random.default_rng(0)
