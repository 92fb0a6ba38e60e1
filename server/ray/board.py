"""The board of the engine replicas: what the ingress needs from all of them, not from one.

Ray Serve sends each call through a deployment handle to one replica; its API has no way to reach
every replica. So each `EngineReplica` posts its state to one small named actor every second: its
engine stats, the registry generation it serves, which adapters it holds and its Prometheus metric
families; each ingress replica posts its request metrics. An ingress keeps a copy of the board,
refreshed every second, for `/metrics` (every process's families, labelled `replica` or
`ingress`), `/ready` (how many engine replicas are up), the dashboard and adapter listings.
Commands that every engine replica must run (load, pin, unload) go the other way: the ingress
posts one, each replica runs it when it next posts, and the answers come back on the board.

A process that has not posted for `STALE_S` is gone (killed, or restarted under a new id). The
board keeps nothing that a few seconds of posts do not rebuild, so Ray may restart it at any time.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import ray

log = logging.getLogger("hotpeft.ray")

NAMESPACE = "hotpeft"
PERIOD_S = 1.0
STALE_S = 5.0
REPLICA, INGRESS = "replica", "ingress"  # the roles of the processes that post
COMMAND_TTL_S = 120.0


@ray.remote(num_cpus=0, max_restarts=-1)
class Board:
    def __init__(self) -> None:
        self.parts: dict[str, tuple[float, str, dict, list]] = {}  # process -> (monotonic time, role, stats, families)
        self.commands: list[tuple[int, float, dict]] = []  # (seq, monotonic time, command)
        self.answers: dict[int, dict[str, object]] = {}  # seq -> replica -> answer
        self.seq = 0

    def post(self, source: str, role: str, stats: dict, families: list, answers: dict[int, object],
             seen: int | None) -> tuple[int, list[tuple[int, dict]]]:
        """A process's state; returns the newest command number and the commands after `seen`
        (None: a replica that just started runs none of the commands posted before it)."""
        now = time.monotonic()
        self.parts[source] = (now, role, stats, families)
        for seq, answer in answers.items():
            if seq in self.answers:
                self.answers[seq][source] = answer
        self._expire(now)
        if seen is None:
            return self.seq, []
        return self.seq, [(s, c) for s, _, c in self.commands if s > seen]

    def read(self) -> dict[str, tuple[str, dict, list]]:
        self._expire(time.monotonic())
        return {source: (role, stats, families) for source, (_, role, stats, families) in self.parts.items()}

    def _replicas(self) -> list[str]:
        return sorted(s for s, (_, role, _, _) in self.parts.items() if role == REPLICA)

    def command(self, command: dict) -> tuple[int, list[str]]:
        """Post a command for every replica; returns its number and the replicas up now."""
        self._expire(time.monotonic())
        self.seq += 1
        self.commands.append((self.seq, time.monotonic(), command))
        self.answers[self.seq] = {}
        return self.seq, self._replicas()

    def answers_to(self, seq: int) -> tuple[dict[str, object], list[str]]:
        """The answers to command `seq` so far, and the replicas up now."""
        self._expire(time.monotonic())
        return dict(self.answers.get(seq, {})), self._replicas()

    def _expire(self, now: float) -> None:
        for source in [s for s, (t, _, _, _) in self.parts.items() if now - t > STALE_S]:
            del self.parts[source]
        while self.commands and now - self.commands[0][1] > COMMAND_TTL_S:
            self.answers.pop(self.commands.pop(0)[0], None)


def board(app_name: str):
    """The application's board, created by whichever process asks first; it outlives any replica."""
    return Board.options(name=f"{app_name}-board", namespace=NAMESPACE, get_if_exists=True,
                         lifetime="detached").remote()


class _Every:
    """A daemon thread that runs `_loop` until `stop`; `_loop` waits PERIOD_S on `_stop` between rounds."""

    def __init__(self, name: str) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        raise NotImplementedError


class Poster(_Every):
    """In a replica: posts `state()` every PERIOD_S; an engine replica runs the commands that come back."""

    def __init__(self, app_name: str, source: str, role: str, state: Callable[[], tuple[dict, list]],
                 execute: Callable[[dict], object] | None = None) -> None:
        super().__init__("hotpeft-board-post")
        self.app_name, self.source, self.role, self.state, self.execute = app_name, source, role, state, execute

    def _loop(self) -> None:
        handle, seen, answers, failing = None, None, {}, False
        while not self._stop.is_set():
            try:
                handle = handle or board(self.app_name)
                stats, families = self.state()
                newest, commands = ray.get(
                    handle.post.remote(self.source, self.role, stats, families, answers, seen), timeout=10)
                answers = {}
                for seq, command in commands if self.execute else ():
                    answers[seq] = self._run(command)
                seen = newest if not commands else max(newest, commands[-1][0])
                failing = False
            except Exception as e:  # noqa: BLE001 - the board restarting or gone: keep serving, try again
                if not failing:
                    log.warning("%s %s cannot post to the board: %r", self.role, self.source, e)
                failing, handle = True, None
            self._stop.wait(PERIOD_S)

    def _run(self, command: dict) -> object:
        try:
            return self.execute(command)
        except Exception as e:  # noqa: BLE001 - the answer is the error, for the ingress to raise
            return e


class BoardView(_Every):
    """In the ingress: the board as of at most PERIOD_S ago, read without blocking a request."""

    def __init__(self, app_name: str) -> None:
        super().__init__("hotpeft-board-read")
        self.app_name = app_name
        self.parts: dict[str, tuple[str, dict, list]] = {}  # process -> (role, stats, families)
        self._handle = None

    def replicas(self) -> dict[str, dict]:
        """The engine replicas up, and their stats."""
        return {source: stats for source, (role, stats, _) in self.parts.items() if role == REPLICA}

    @property
    def handle(self):
        if self._handle is None:
            self._handle = board(self.app_name)
        return self._handle

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.parts = ray.get(self.handle.read.remote(), timeout=10)
            except Exception as e:  # noqa: BLE001 - keep the last view; the next read may work
                log.warning("cannot read the replicas' board: %r", e)
                self._handle = None
            self._stop.wait(PERIOD_S)

    def command(self, command: dict, timeout: float) -> dict[str, object]:
        """Blocking: post `command`, wait until every replica up at that moment answered (or
        `timeout`); returns replica -> answer (a result or the exception it raised)."""
        seq, replicas = ray.get(self.handle.command.remote(command), timeout=10)
        deadline = time.monotonic() + timeout
        answers: dict[str, object] = {}
        while time.monotonic() < deadline:
            answers, up = ray.get(self.handle.answers_to.remote(seq), timeout=10)
            if all(r in answers or r not in up for r in replicas):  # answered, or gone meanwhile
                return answers
            time.sleep(0.1)
        missing = sorted(set(replicas) - set(answers))
        raise TimeoutError(f"engine replica(s) {', '.join(missing)} did not answer within {timeout:.0f} s")
