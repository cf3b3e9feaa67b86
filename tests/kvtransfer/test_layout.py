"""KVLayout, run merging and byte ranges: pure functions, no processes."""

import numpy as np
import pytest
import torch

from tandem.kvtransfer import BlockRun, KVLayout, LayoutMismatch, byte_ranges, merge_runs

LAYOUT = KVLayout(num_layers=4, num_blocks=64, block_size=16, num_kv_heads=2, head_dim=128,
                  dtype="float32")


def test_block_bytes_and_offsets_match_the_tensor():
    kv = LAYOUT.allocate()
    assert KVLayout.from_tensor(kv) == LAYOUT
    assert LAYOUT.block_bytes == 2 * 16 * 2 * 128 * 4
    assert LAYOUT.layer_stride == 64 * LAYOUT.block_bytes
    base = kv.data_ptr()
    assert kv[2, 7].data_ptr() - base == LAYOUT.offset(2, 7) == (2 * 64 + 7) * LAYOUT.block_bytes
    assert KVLayout(32, 100, 16, 8, 128, "bfloat16").block_bytes == 65536


def test_dict_round_trip_and_bad_input():
    assert KVLayout.from_dict(LAYOUT.to_dict()) == LAYOUT
    with pytest.raises(ValueError, match="lacks"):
        KVLayout.from_dict({"num_layers": 4})
    with pytest.raises(ValueError, match="dtype"):
        KVLayout(4, 64, 16, 2, 128, "float33")
    with pytest.raises(ValueError, match="contiguous"):
        KVLayout.from_tensor(torch.empty(4, 64, 2, 16, 2, 256)[..., :128])


@pytest.mark.parametrize("field,value", [("num_layers", 3), ("block_size", 32),
                                         ("num_kv_heads", 4), ("head_dim", 64),
                                         ("dtype", "bfloat16")])
def test_compatibility_names_the_field(field, value):
    other = KVLayout(**{**LAYOUT.to_dict(), field: value})
    with pytest.raises(LayoutMismatch, match=field) as err:
        LAYOUT.check_compatible(other)
    assert err.value.field == field and err.value.peer == value


def test_num_blocks_may_differ():
    LAYOUT.check_compatible(KVLayout(**{**LAYOUT.to_dict(), "num_blocks": 1000}))


def test_merge_runs_on_both_sides():
    assert merge_runs([1, 2, 3, 7, 8], [10, 11, 12, 20, 21]) == [BlockRun(1, 10, 3),
                                                                  BlockRun(7, 20, 2)]
    # consecutive on one side only: no merge
    assert merge_runs([1, 2, 3], [5, 9, 10]) == [BlockRun(1, 5, 1), BlockRun(2, 9, 2)]
    assert merge_runs([4, 3], [1, 2]) == [BlockRun(4, 1, 1), BlockRun(3, 2, 1)]
    assert merge_runs([], []) == []
    with pytest.raises(ValueError):
        merge_runs([1, 2], [1])


def test_byte_ranges_never_merge_across_layers():
    dst = KVLayout(**{**LAYOUT.to_dict(), "num_blocks": 100})
    runs = merge_runs(range(60, 64), range(0, 4))  # block 63 of layer l is next to 0 of l+1
    rows = byte_ranges(runs, [0, 1, 2], LAYOUT, dst)
    bb = LAYOUT.block_bytes
    assert rows.tolist() == [[(l * 64 + 60) * bb, l * 100 * bb, 4 * bb] for l in range(3)]
    assert byte_ranges([], [0], LAYOUT, dst).shape == (0, 3)
