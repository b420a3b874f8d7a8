"""The one layout vocabulary (:mod:`lowrank_optim.kernels.layout`): sides to layouts, slot dims."""
import pytest
import torch
from lowrank_optim.kernels.layout import LAYOUTS, check_layout, layout_for, slot_broadcast_shape, slot_dim


def test_layout_for_side():
    assert (layout_for("right"), layout_for("left"), layout_for(None)) == ("columns", "rows", "flat")
    with pytest.raises(ValueError, match="Invalid side: 'up'"):
        layout_for("up")


def test_slot_dims_index_the_slots_of_projected_moments():
    """Slots are the columns of R = G·P (m×r) and the rows of R = Pᵀ·G (r×n)."""
    right, left = torch.zeros(7, 3), torch.zeros(3, 7)
    assert right.shape[slot_dim(layout_for("right"))] == 3 and left.shape[slot_dim(layout_for("left"))] == 3
    assert slot_dim("flat") is None
    per_slot = torch.arange(3.0)
    assert (right + per_slot.view(slot_broadcast_shape("columns")))[5].tolist() == [0.0, 1.0, 2.0]
    assert (left + per_slot.view(slot_broadcast_shape("rows")))[:, 5].tolist() == [0.0, 1.0, 2.0]


def test_invalid_layouts_are_named():
    assert set(LAYOUTS) == {"columns", "rows", "flat"}
    for call in (check_layout, slot_dim):
        with pytest.raises(ValueError, match="Invalid layout: 'diagonal'"):
            call("diagonal")
    with pytest.raises(ValueError, match="got 'flat'"):
        slot_broadcast_shape("flat")
