"""Trainer test fixtures: one tiny train shard directory for the whole session."""
from __future__ import annotations

from pathlib import Path

import pytest

from trainer_fixtures import build_train_dir


@pytest.fixture(scope="session")
def tiny_train_dir(tmp_path_factory) -> Path:
    """4 shards x 48 samples, 2 cached views each (float16), targets of the tiny teacher."""
    return build_train_dir(tmp_path_factory.mktemp("tiny_train"), shards=4, per_shard=48)
