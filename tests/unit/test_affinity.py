"""Adapter affinity (core.affinity): a LoRA job goes to a worker holding its LoRAs only
while that worker has a free slot."""

from __future__ import annotations

from core.affinity import WorkerView, preferred_worker


def worker(node: str, resident: set[str], load: int = 0, capacity: int = 2) -> WorkerView:
    return WorkerView(node, frozenset(resident), capacity, load)


def test_a_job_goes_to_the_worker_holding_its_lora() -> None:
    workers = [worker("a@h", {"x"}), worker("b@h", {"y"})]
    assert preferred_worker(["y"], workers) == "b@h"


def test_no_lora_or_no_holder_means_the_shared_queue() -> None:
    workers = [worker("a@h", {"x"})]
    assert preferred_worker([], workers) is None
    assert preferred_worker(["z"], workers) is None
    assert preferred_worker(["x"], []) is None


def test_a_holder_without_a_free_slot_is_passed_over() -> None:
    """Its jobs in hand plus those waiting in its own queue fill its batch: the job would
    wait there while other workers may idle, so it goes to the shared queue."""
    assert preferred_worker(["x"], [worker("a@h", {"x"}, load=2, capacity=2)]) is None
    assert preferred_worker(["x"], [worker("a@h", {"x"}, load=1, capacity=2),
                                    worker("b@h", {"x"}, load=2, capacity=2)]) == "a@h"


def test_the_worker_holding_more_of_the_loras_wins_then_the_less_loaded() -> None:
    assert preferred_worker(["x", "y"], [worker("a@h", {"x"}),
                                         worker("b@h", {"x", "y"}, load=1)]) == "b@h"
    assert preferred_worker(["x"], [worker("a@h", {"x"}, load=1),
                                    worker("b@h", {"x"}, load=0)]) == "b@h"


def test_equal_workers_give_a_stable_choice() -> None:
    workers = [worker("b@h", {"x"}), worker("a@h", {"x"})]
    assert preferred_worker(["x"], workers) == preferred_worker(["x"], workers[::-1]) == "a@h"


def test_queue_mode_waits_at_a_holder_only_when_every_worker_is_busy() -> None:
    """The job would wait anyway: at most one batch waits in the holder's own queue."""
    busy = [worker("a@h", {"x"}, load=2), worker("b@h", set(), load=2)]
    assert preferred_worker(["x"], busy, mode="free") is None
    assert preferred_worker(["x"], busy, mode="queue") == "a@h"
    assert preferred_worker(["x"], [worker("a@h", {"x"}, load=4), worker("b@h", set(), load=2)],
                            mode="queue") is None  # a batch already waits there
    # another worker has a free slot: the job starts there rather than wait for the holder
    assert preferred_worker(["x"], [worker("a@h", {"x"}, load=2), worker("b@h", set())],
                            mode="queue") is None


def test_off_sends_every_job_to_the_shared_queue() -> None:
    assert preferred_worker(["x"], [worker("a@h", {"x"})], mode="off") is None
