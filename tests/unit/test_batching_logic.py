"""Batch admission at step boundaries (core.batching, pure)."""

from __future__ import annotations

import pytest

from core.batching import Slot, admit

SMALL, LARGE = (64, 64), (128, 128)


def slots(*specs: tuple[str, tuple[int, int]]) -> list[Slot]:
    return [Slot(job_id, shape) for job_id, shape in specs]


def ids(joining: list[Slot]) -> list[str]:
    return [slot.job_id for slot in joining]


def test_jobs_of_the_batch_shape_join_in_arrival_order_up_to_capacity():
    active = slots(("a", SMALL))
    waiting = slots(("b", SMALL), ("c", SMALL), ("d", SMALL))
    assert ids(admit(active, waiting, capacity=3)) == ["b", "c"]
    assert ids(admit([], waiting, capacity=8)) == ["b", "c", "d"]
    assert admit(slots(("a", SMALL), ("b", SMALL)), waiting, capacity=2) == []


def test_an_empty_batch_takes_the_oldest_waiting_jobs_shape():
    waiting = slots(("big", LARGE), ("b", SMALL), ("big2", LARGE))
    assert ids(admit([], waiting, capacity=4)) == ["big"]


def test_the_oldest_job_of_another_shape_stops_admission_so_the_batch_drains():
    """Nobody passes it: the small job behind it waits too, and once the batch is empty
    the large job's shape is next (no starvation)."""
    active = slots(("a", SMALL))
    waiting = slots(("big", LARGE), ("b", SMALL))
    assert admit(active, waiting, capacity=4) == []
    assert ids(admit([], waiting, capacity=4)) == ["big"]


def test_a_redelivered_job_runs_alone():
    redelivered = Slot("r", SMALL, redelivered=True)
    active = slots(("a", SMALL))
    assert admit(active, [redelivered, *slots(("b", SMALL))], capacity=4) == []
    assert admit([], [redelivered, *slots(("b", SMALL))], capacity=4) == [redelivered]
    assert admit([redelivered], slots(("b", SMALL)), capacity=4) == []
    # Behind fresh jobs, it stops admission like a job of another shape.
    assert ids(admit([], [*slots(("b", SMALL)), redelivered, *slots(("c", SMALL))],
                     capacity=4)) == ["b"]


def test_capacity_must_be_positive():
    with pytest.raises(ValueError, match="capacity 0"):
        admit([], [], capacity=0)
