"""What a GPU worker's lease names (workers.lease.Holdings), with fake kombu messages and an
injected clock: a message is held from its receipt until its task ends or Celery lets its
request go, and unacknowledged ones are re-pointed to a new channel after a reconnection."""

from __future__ import annotations

from dataclasses import dataclass

from workers.lease import Holdings


@dataclass
class FakeMessage:
    delivery_tag: str
    channel: object = "old channel"
    acknowledged: bool = False


def test_a_message_is_held_from_receipt_until_its_task_ends() -> None:
    clock = [100.0]
    holdings = Holdings(lambda: {"t1", "t2"}, now=lambda: clock[0], settle_s=5.0)
    holdings.received("t1", FakeMessage("tag-1"))
    holdings.received("t2", FakeMessage("tag-2"))
    assert holdings.tags() == {"tag-1", "tag-2"}
    holdings.ended("t1")
    holdings.ended("never-received")
    assert holdings.tags() == {"tag-2"}


def test_a_request_celery_let_go_is_released_once_settled_not_before() -> None:
    clock = [100.0]
    celery_keeps: set[str] = set()
    holdings = Holdings(lambda: set(celery_keeps), now=lambda: clock[0], settle_s=5.0)
    holdings.received("stuck", FakeMessage("tag-stuck"))
    celery_keeps.add("stuck")
    holdings.received("fresh", FakeMessage("tag-fresh"))  # Celery records it just after
    clock[0] += 4.9
    assert holdings.tags() == {"tag-stuck", "tag-fresh"}
    celery_keeps.discard("stuck")  # dropped unstarted at a lost connection, say
    clock[0] += 0.2
    assert holdings.tags() == set()


def test_after_a_reconnection_unacknowledged_messages_are_acknowledged_on_the_new_channel(
        ) -> None:
    holdings = Holdings(lambda: set(), now=lambda: 0.0)
    running, acked = FakeMessage("tag-running"), FakeMessage("tag-acked", acknowledged=True)
    holdings.received("t1", running)
    holdings.received("t2", acked)
    holdings.ended("t1")  # the task ended; its acknowledgement may still be on its way
    holdings.reconnected("new channel")
    assert running.channel == "new channel" and acked.channel == "old channel"
