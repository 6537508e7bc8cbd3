"""The scanner's page keys: the batch path (the C extension, where built) gives xxhash's keys."""

from __future__ import annotations

import numpy as np
import pytest
import xxhash

from shmksm import PAGE_SIZE
from shmksm._ksm import checksum


@pytest.fixture(params=["extension", "xxhash"])
def checksums(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> object:
    if request.param == "extension":
        if checksum._C_CHECKSUMS is None:
            pytest.skip("the C extension is not built")
    else:
        monkeypatch.setattr(checksum, "_C_CHECKSUMS", None)
    return checksum.checksums


def test_batch_keys_are_xxhash_keys(checksums: object) -> None:
    rng = np.random.default_rng(7)
    pool = rng.integers(0, 256, size=64 * PAGE_SIZE, dtype=np.uint8)
    pool[5 * PAGE_SIZE:6 * PAGE_SIZE] = 0
    pfns = np.concatenate([rng.permutation(64), [5, 5, 63, 0]]).astype(np.int64)
    keys = checksum.checksums(memoryview(pool), pfns)
    assert keys.dtype == np.uint64 and len(keys) == len(pfns)
    want = [xxhash.xxh3_64_intdigest(pool[p * PAGE_SIZE:(p + 1) * PAGE_SIZE]) for p in pfns.tolist()]
    assert keys.tolist() == want
    assert checksum.checksums(memoryview(pool), np.zeros(0, np.int64)).tolist() == []


def test_a_frame_outside_the_pool_is_refused() -> None:
    if checksum._C_CHECKSUMS is None:
        pytest.skip("the C extension is not built")
    pool = np.zeros(4 * PAGE_SIZE, np.uint8)
    for bad in (4, -1):
        with pytest.raises(ValueError, match="not in the pool"):
            checksum.checksums(memoryview(pool), np.array([0, bad], np.int64))
