"""Two replicas of the tracker, as two separate processes sharing one redis-server.

A deployment with several replicas (docs/cvat.md) sends each call of a session to whichever
replica is free. Here the calls of one session alternate between two real processes; the shapes
must be exactly those one process returns. The per-session lock and the step count live in
Redis, so they hold across processes too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cvat_helpers import b64png
from cvat_sdk.masks import encode_mask

from cvat_function.sessions import RedisSessionStore
from napari_stm.core.engine import PropagationConfig

REPLICA = Path(__file__).with_name("replica.py")


class Replica:
    def __init__(self, host: str, port: int) -> None:
        env = dict(os.environ)
        env.update(
            NAPARI_STM_MODEL="lite0-match",
            NAPARI_STM_DEVICE="cpu",
            CVAT_FUNCTIONS_REDIS_HOST=host,
            CVAT_FUNCTIONS_REDIS_PORT=str(port),
            OMP_NUM_THREADS="1",
        )
        self.proc = subprocess.Popen(
            [sys.executable, str(REPLICA)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )

    def wait_ready(self) -> int:
        line = self.proc.stdout.readline()
        assert line, f"replica exited with {self.proc.wait()}"
        return json.loads(line)["ready"]

    def send(self, body: dict) -> None:
        self.proc.stdin.write(json.dumps(body) + "\n")
        self.proc.stdin.flush()

    def receive(self) -> tuple[int, dict]:
        reply = json.loads(self.proc.stdout.readline())
        return reply["status"], reply["body"]

    def call(self, body: dict) -> tuple[int, dict]:
        self.send(body)
        return self.receive()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def replicas(redis_server):
    pair = [Replica(*redis_server), Replica(*redis_server)]  # both load the model at once
    try:
        pids = [r.wait_ready() for r in pair]
        assert len(set(pids)) == 2
        yield pair
    finally:
        for r in pair:
            r.close()


def start(replica: Replica, frame, mask) -> dict:
    shape = {"type": "mask", "points": encode_mask(mask)}
    status, reply = replica.call({"image": b64png(frame), "shapes": [shape], "states": []})
    assert status == 200, reply
    return reply["states"][0]


def step(replica: Replica, frame, state: dict) -> tuple[dict, dict]:
    status, reply = replica.call({"image": b64png(frame), "shapes": [None], "states": [state]})
    assert status == 200, reply
    return reply["shapes"][0], reply["states"][0]


def test_alternating_replicas_give_the_shapes_of_one_process(replicas, clip):
    frames, labels = clip
    a, b = replicas
    one = start(a, frames[0], labels[0] == 1)
    both = start(b, frames[0], labels[0] == 1)
    alone, alternating = [], []
    for t in range(1, len(frames)):
        shape, one = step(a, frames[t], one)
        alone.append(shape)
        shape, both = step(replicas[t % 2], frames[t], both)
        alternating.append(shape)
    assert alternating == alone  # the same RLE masks, frame by frame
    assert sum(s is not None for s in alone) == len(frames) - 1


def test_session_lock_and_step_count_hold_across_processes(replicas, clip, model, redis_server):
    import redis

    frames, labels = clip
    a, b = replicas
    state = start(a, frames[0], labels[0] == 1)
    _, state = step(b, frames[1], state)

    # Both replicas get the same next call at once: one steps the session; the other is
    # refused, as busy (the lock) or as a replay (the step count), whichever it meets.
    body = {"image": b64png(frames[2]), "shapes": [None], "states": [state]}
    a.send(body)
    b.send(body)
    (status_a, reply_a), (status_b, reply_b) = a.receive(), b.receive()
    assert sorted([status_a, status_b]) == [200, 409], (reply_a, reply_b)
    state = (reply_a if status_a == 200 else reply_b)["states"][0]

    # A lock taken by a third process (this one) keeps both replicas off the session.
    store = RedisSessionStore(redis.Redis(*redis_server), model, PropagationConfig())
    with store.locked([state["session"]]):
        for replica in (a, b):
            status, reply = replica.call(
                {"image": b64png(frames[3]), "shapes": [None], "states": [state]}
            )
            assert status == 409 and "right now" in reply["error"], reply
    # Released: the session goes on from where it was, on either replica.
    _, state = step(b, frames[3], state)
    _, state = step(a, frames[4], state)
