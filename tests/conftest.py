"""Test-wide settings: offline hubs, shared data location, the gpu marker."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
IU_ARCHIVE = SHARED_DATA / "iu" / "NLMCXR_reports.tgz"
IU_IMAGES = SHARED_DATA / "iu" / "images"


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def iu_archive() -> Path:
    if not IU_ARCHIVE.is_file():
        pytest.skip(f"{IU_ARCHIVE} not present")
    return IU_ARCHIVE


@pytest.fixture(scope="session")
def iu_images() -> Path:
    if not IU_IMAGES.is_dir():
        pytest.skip(f"{IU_IMAGES} not present")
    return IU_IMAGES
