"""watch.step_queue: steps taken lowest first and never before their time, each queued once, put back with a delay
on re-queue (keeping its attempts), dropped when its folder goes, and stop/drain ending the export thread's wait."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from molgen_export.watch.step_queue import QueuedStep, StepQueue

ROOT = Path("/run/checkpoint")


def _dir(step: int) -> Path:
    return ROOT / f"step-{step}"


def _take_soon(queue: StepQueue, within: float = 2.0) -> QueuedStep | None:
    """take() with a deadline: the queue is stopped if nothing comes (then the result is None)."""
    timer = threading.Timer(within, queue.stop)
    timer.start()
    try:
        return queue.take(lambda: None)
    finally:
        timer.cancel()


def test_lowest_step_first_numerically():
    queue = StepQueue(draining=True)
    for step in (100, 20, 3, 10):
        queue.add(step, _dir(step), "scan")
    assert queue.waiting() == [3, 10, 20, 100]
    assert [queue.take(lambda: None).step for _ in range(4)] == [3, 10, 20, 100]
    assert queue.take(lambda: None) is None  # drained


def test_adding_a_queued_step_again_keeps_one_entry():
    queue = StepQueue(draining=True)
    before = time.time()
    queue.add(10, _dir(10), "inotify")
    time.sleep(0.05)
    queue.add(10, _dir(10), "scan")
    queue.add(10, ROOT / "elsewhere" / "step-10", "poll")
    assert queue.waiting() == [10]
    item = queue.take(lambda: None)
    assert (item.via, item.step_dir, item.attempts) == ("inotify", _dir(10), 0)  # the first sighting's record
    assert before <= item.seen_at < before + 0.05  # the detect latency counts from the first sighting
    assert queue.take(lambda: None) is None


def test_a_delayed_step_is_not_taken_before_its_time_and_does_not_block_others():
    queue = StepQueue()
    queue.add(5, _dir(5), "inotify", delay=0.4)  # settling
    queue.add(7, _dir(7), "inotify")
    started = time.monotonic()
    assert _take_soon(queue).step == 7  # the higher step is ready, the lower one is not
    assert _take_soon(queue).step == 5
    assert time.monotonic() - started >= 0.4


def test_an_undelayed_add_brings_a_settling_step_forward():
    queue = StepQueue()
    queue.add(5, _dir(5), "inotify", delay=60)
    queue.add(5, _dir(5), "scan")
    started = time.monotonic()
    assert _take_soon(queue).step == 5
    assert time.monotonic() - started < 1.0


def test_requeue_puts_the_step_back_after_its_delay_keeping_its_attempts():
    queue = StepQueue()
    queue.add(10, _dir(10), "scan")
    item = _take_soon(queue)
    assert queue.waiting() == []
    item.attempts += 1  # the export failed once
    queue.requeue(item, delay=0.3)
    assert queue.waiting() == [10]
    started = time.monotonic()
    again = _take_soon(queue)
    assert again is item and again.attempts == 1
    assert time.monotonic() - started >= 0.3


def test_a_retry_is_not_brought_forward_by_a_new_sighting():
    queue = StepQueue()
    queue.add(10, _dir(10), "scan")
    item = _take_soon(queue)
    item.attempts = 2
    queue.requeue(item, delay=60)
    queue.add(10, _dir(10), "inotify")  # the observer sees it again: the backoff still holds
    assert _take_soon(queue, within=0.6) is None


def test_requeue_yields_to_a_fresh_entry_and_to_stop():
    queue = StepQueue()
    queue.add(10, _dir(10), "scan")
    item = _take_soon(queue)
    queue.add(10, _dir(10), "inotify")  # seen again while it was being exported
    item.attempts = 1
    queue.requeue(item, delay=0)
    fresh = _take_soon(queue)
    assert fresh is not item and fresh.via == "inotify" and fresh.attempts == 0
    queue.stop()
    queue.requeue(item, delay=0)
    assert queue.waiting() == []


def test_forget_drops_only_the_step_of_that_folder():
    queue = StepQueue()
    queue.add(10, _dir(10), "scan")
    assert queue.forget(10, ROOT / "other" / "step-10") is None
    assert queue.forget(20, _dir(20)) is None
    forgotten = queue.forget(10, _dir(10))
    assert forgotten is not None and forgotten.step == 10
    assert queue.waiting() == []


def test_stop_empties_refuses_and_wakes_the_taker():
    queue = StepQueue()
    queue.add(10, _dir(10), "scan", delay=60)
    result: list = []
    taker = threading.Thread(target=lambda: result.append(queue.take(lambda: None)))
    taker.start()
    time.sleep(0.1)
    assert queue.stop() is False
    taker.join(timeout=2)
    assert not taker.is_alive() and result == [None]
    assert queue.waiting() == [] and queue.finished()
    queue.add(20, _dir(20), "scan")
    assert queue.waiting() == []  # refused while stopping
    assert queue.stop() is True  # already stopping
    assert queue.wait(10) is False  # returns at once


def test_drain_finishes_what_is_queued_then_ends():
    queue = StepQueue()
    queue.add(10, _dir(10), "scan")
    queue.add(20, _dir(20), "scan", delay=0.2)
    assert not queue.finished()
    queue.drain()
    assert not queue.finished()  # two still queued
    assert [_take_soon(queue).step, _take_soon(queue).step] == [10, 20]  # waits for the delayed one
    assert queue.finished()
    assert queue.take(lambda: None) is None


def test_the_taker_wakes_up_while_it_waits():
    queue = StepQueue()
    wakes: list[float] = []
    queue.add(10, _dir(10), "scan", delay=1.2)
    started = time.monotonic()
    item = queue.take(lambda: wakes.append(time.monotonic() - started))
    assert item.step == 10
    assert len(wakes) >= 2 and all(b - a <= 1.0 for a, b in zip([0.0, *wakes], wakes))


def test_steps_added_from_many_threads_are_each_taken_once_in_order():
    queue = StepQueue()
    steps = list(range(1, 201))

    def add(part: list[int]) -> None:
        for step in part:
            queue.add(step, _dir(step), "poll")
            queue.add(step, _dir(step), "scan")

    threads = [threading.Thread(target=add, args=(steps[i::4],)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    queue.drain()
    taken = []
    while (item := queue.take(lambda: None)) is not None:
        taken.append(item.step)
    assert taken == steps
