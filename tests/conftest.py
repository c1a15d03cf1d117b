"""Shared fixtures and guards for the whole test session.

Tests never download: the Hub and datasets are switched offline before anything imports huggingface_hub.
Markers: `gpu` tests are skipped without CUDA; `real_model` tests are skipped without the offline model parts.
"""

from __future__ import annotations

import os

# Before any import of huggingface_hub / datasets (they read these once, at import).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `-n 2` on 2 cores: one torch thread per worker, not 2 on each core
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import functools  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from tiny_models import shared_tokenizer, tiny_model_dir, tokenizer  # noqa: E402

from qwentune.model.offline import OFFLINE_EXTRA_HINT, OFFLINE_MODEL, offline_available  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if any(item.get_closest_marker("gpu") for item in items):
        import torch

        if not torch.cuda.is_available():
            skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
            for item in items:
                if item.get_closest_marker("gpu"):
                    item.add_marker(skip_gpu)
    if any(item.get_closest_marker("real_model") for item in items) and not offline_available():
        skip_real = pytest.mark.skip(reason=f"needs the offline real model: {OFFLINE_EXTRA_HINT}")
        for item in items:
            if item.get_closest_marker("real_model"):
                item.add_marker(skip_real)


@pytest.fixture(scope="session")
def qwen_tokenizer():
    """The real Qwen2.5 tokenizer with the official Qwen2.5-Instruct template; shared by all tests: don't modify."""
    return shared_tokenizer("qwen2.5-instruct")


@pytest.fixture
def make_tokenizer():
    """`make_tokenizer(template_name)` → a fresh tokenizer the test may modify."""
    return tokenizer


@pytest.fixture
def tiny_model_path(tmp_path: Path) -> Path:
    """A tiny random Qwen2.5-0.5B-Instruct-shaped model directory, owned by this test."""
    return tiny_model_dir(tmp_path)


@pytest.fixture
def make_tiny_model_dir(tmp_path: Path):
    """`make_tiny_model_dir(name=..., template=..., seed=..., **tiny_config_kwargs)` → a model dir in tmp_path."""
    return functools.partial(tiny_model_dir, tmp_path)


@pytest.fixture(scope="session")
def offline_model_dir() -> Path:
    """The dequantized offline real model (converted once into the user's qwentune cache, then reused)."""
    if not offline_available():
        pytest.skip(f"needs the offline real model: {OFFLINE_EXTRA_HINT}")
    from qwentune.model.sources import resolve_model

    return resolve_model(OFFLINE_MODEL, progress=False).path
