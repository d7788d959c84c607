"""frozen_heap: the heap is frozen only inside the block and always handed back."""

import gc

import pytest

from insitu.engines.heap import frozen_heap


def test_frozen_inside_and_unfrozen_after_even_on_error():
    assert gc.get_freeze_count() == 0
    with pytest.raises(RuntimeError):
        with frozen_heap():
            assert gc.get_freeze_count() > 0
            raise RuntimeError("boom")
    assert gc.get_freeze_count() == 0


def test_leaves_a_callers_own_freeze_alone():
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        with frozen_heap():
            pass
        assert gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()
