"""Shared helpers of the reward tests: reward functions that misbehave on purpose.

The reward pool's worker processes unpickle reward functions by module name, so these live at
module level in a module that imports nothing heavy (a worker that had to import torch to load
a test module would take seconds to start). Tests get them through the `misbehaving` fixture.
pytest's importlib mode does not put the repository root on sys.path, which the workers need to
import `tests.reward.conftest` (they copy the parent's sys.path at start), so it is put there
for the session.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from megatron_r1.reward.types import RewardFn, Sample

REPO_ROOT = Path(__file__).resolve().parents[2]


def length_reward(completion: str, sample: Sample) -> float:
    """The completion's length: a value that identifies which completion was scored."""
    return float(len(completion))


def raising_reward(completion: str, sample: Sample) -> float:
    """Raises on "boom", returns NaN on "nan", else 0.5."""
    if "boom" in completion:
        raise RuntimeError("boom in completion")
    if "nan" in completion:
        return math.nan
    return 0.5


def slow_reward(completion: str, sample: Sample) -> float:
    """Sleeps a minute on "slow", kills its own process on "die", else 1.0."""
    if "slow" in completion:
        time.sleep(60)
    if "die" in completion:
        os._exit(3)
    return 1.0


def _fail_to_load() -> None:
    raise ImportError("this reward function cannot be loaded")


class UnloadableReward:
    """Pickles in the parent, fails to unpickle in a worker (as an unimportable module would)."""

    def __call__(self, completion: str, sample: Sample) -> float:
        return 0.0

    def __reduce__(self) -> tuple[object, tuple[()]]:
        return (_fail_to_load, ())


@dataclass(frozen=True)
class Misbehaving:
    length: RewardFn
    raising: RewardFn
    slow: RewardFn
    unloadable: RewardFn


@pytest.fixture(scope="session")
def misbehaving() -> Misbehaving:
    return Misbehaving(length=length_reward, raising=raising_reward, slow=slow_reward,
                       unloadable=UnloadableReward())


@pytest.fixture(scope="session", autouse=True)
def _repo_root_on_sys_path() -> Iterator[None]:
    if str(REPO_ROOT) in sys.path:
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(REPO_ROOT))
        yield
