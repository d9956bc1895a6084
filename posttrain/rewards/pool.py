"""Where reward calls run: a pool of worker processes with a wall-clock limit per call, or inline.

`WorkerPool`: `num_workers` processes started with multiprocessing's "spawn" context (a fresh interpreter:
a parent holding torch's threads and locks cannot deadlock them, as a forked child can). Each worker builds
the reward functions once (importing only posttrain.rewards and the user's reward modules), says it is
ready, then scores one call at a time. A call's limit starts when it is sent to a ready worker; a worker
still busy at the limit is killed (SIGKILL: a hung math-verify or C extension cannot ignore it) and
replaced by a fresh one, and the call's outcome is TIMEOUT. A worker that dies mid-call fails that call.

`InlineRunner` (`num_workers: 0`, for debugging): calls run in the calling process. The limit is best-effort:
in the main thread a SIGALRM timer interrupts Python code at the limit (not a call blocked inside a C
extension); elsewhere nothing interrupts a call, and one that ran past the limit is marked TIMEOUT after it
returns.

Runners return one outcome per call: a RewardResult, TIMEOUT, a CallFailed (the reward raised; its message
names the exception and where it was raised), or None for calls not run because an earlier call failed.
"""

from __future__ import annotations

import multiprocessing
import signal
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Iterable, Optional, Union

from posttrain.errors import PosttrainError
from posttrain.rewards.base import RewardError, RewardFunction, RewardResult, to_reward_result
from posttrain.examples import PromptExample
from posttrain.rewards.registry import RewardTerm

WORKER_START_TIMEOUT_S = 120.0  # start-up (interpreter, imports, building the rewards) is not a call's time

Call = tuple[int, str, PromptExample]  # (term index, completion, example)


@dataclass
class CallFailed:
    message: str


class _Timeout:
    def __repr__(self) -> str:
        return "TIMEOUT"


TIMEOUT = _Timeout()
Outcome = Union[RewardResult, CallFailed, _Timeout, None]


def describe_exception(exc: BaseException) -> str:
    if isinstance(exc, PosttrainError):
        return str(exc)
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (raised at {frames[-1].filename}:{frames[-1].lineno}, in {frames[-1].name})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


def call_reward(function: RewardFunction, label: str, completion: str, example: PromptExample) -> Outcome:
    try:
        return to_reward_result(function(completion, example), f"reward {label!r}")
    except Exception as exc:
        return CallFailed(describe_exception(exc))


def _worker_main(conn: Connection, terms: list[RewardTerm], search_dirs: list[str]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the parent stops us
    try:
        from posttrain.rewards.registry import build_reward_function

        functions = [build_reward_function(t, i, search_dirs) for i, t in enumerate(terms)]
    except BaseException as exc:
        conn.send(("init_error", describe_exception(exc)))
        return
    labels = [t.display_name for t in terms]
    conn.send(("ready",))
    while True:
        try:
            message = conn.recv()
        except EOFError:  # the parent is gone
            return
        if message is None:
            return
        call_id, term_index, completion, example = message
        conn.send((call_id, call_reward(functions[term_index], labels[term_index], completion, example)))


@dataclass
class _Worker:
    process: Any
    conn: Connection
    started: float
    ready: bool = False
    call: Optional[int] = None
    deadline: float = 0.0


class WorkerPool:
    """Reward calls in `num_workers` spawned processes, each call limited to `timeout_s` seconds."""

    def __init__(self, terms: list[RewardTerm], num_workers: int, timeout_s: float, search_dirs: Iterable[Path] = ()):
        self._context = multiprocessing.get_context("spawn")
        self._args = (list(terms), [str(Path(d).resolve()) for d in search_dirs])
        self.timeout_s = timeout_s
        self.replaced = 0
        self._workers = [self._start() for _ in range(num_workers)]

    def _start(self) -> _Worker:
        ours, theirs = self._context.Pipe()
        process = self._context.Process(target=_worker_main, args=(theirs, *self._args),
                                        name="posttrain-reward-worker", daemon=True)
        process.start()
        theirs.close()  # the worker's end lives in the worker: its death reads as EOF here
        return _Worker(process, ours, time.monotonic())

    @staticmethod
    def _stop(worker: _Worker) -> None:
        worker.process.kill()
        worker.process.join(5)
        worker.conn.close()

    def _replace(self, worker: _Worker) -> None:
        self._stop(worker)
        self._workers[self._workers.index(worker)] = self._start()
        self.replaced += 1

    def _fail_start(self, message: str) -> None:
        self.close()
        raise RewardError(f"reward worker process: {message}")

    def run(self, calls: list[Call]) -> list[Outcome]:
        if not self._workers:
            raise RewardError("the reward pool is closed.")
        outcomes: list[Outcome] = [None] * len(calls)
        queue = deque(range(len(calls)))
        failed = False
        while True:
            now = time.monotonic()
            for worker in list(self._workers):
                if failed or not queue or not worker.ready or worker.call is not None:
                    continue
                index = queue.popleft()
                try:
                    worker.conn.send((index, *calls[index]))
                except OSError:  # died while idle: retry the call on a fresh worker
                    queue.appendleft(index)
                    self._replace(worker)
                    continue
                worker.call, worker.deadline = index, now + self.timeout_s
            waiting = [w for w in self._workers if w.call is not None or not w.ready]
            if not any(w.call is not None for w in waiting) and (failed or not queue):
                return outcomes
            limit = min(w.deadline if w.call is not None else w.started + WORKER_START_TIMEOUT_S for w in waiting)
            by_conn = {w.conn: w for w in waiting}
            for conn in wait(list(by_conn), timeout=max(0.0, limit - now)):
                worker = by_conn[conn]
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    worker.process.join(1)
                    code = worker.process.exitcode
                    if worker.call is None:
                        self._fail_start(f"exited during start-up (exit code {code}).")
                    outcomes[worker.call] = CallFailed(f"the reward worker process died (exit code {code}) during "
                                                       f"the call")
                    failed = True
                    worker.call = None
                    self._replace(worker)
                    continue
                if message[0] == "ready":
                    worker.ready = True
                elif message[0] == "init_error":
                    self._fail_start(f"cannot build the rewards: {message[1]}")
                else:
                    index, outcome = message
                    outcomes[index] = outcome
                    failed = failed or isinstance(outcome, CallFailed)
                    worker.call = None
            now = time.monotonic()
            for worker in list(self._workers):
                if worker.call is not None and now >= worker.deadline:
                    outcomes[worker.call] = TIMEOUT
                    self._replace(worker)
                elif not worker.ready and now - worker.started > WORKER_START_TIMEOUT_S:
                    self._fail_start(f"did not start within {WORKER_START_TIMEOUT_S:.0f} s (importing the reward "
                                     f"modules hangs?).")

    def close(self) -> None:
        workers, self._workers = self._workers, []
        for worker in workers:
            if worker.call is None:
                try:
                    worker.conn.send(None)
                except OSError:
                    pass
        for worker in workers:
            worker.process.join(2 if worker.call is None else 0)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(5)
            worker.conn.close()


class _CallTimedOut(BaseException):
    """Raised by the inline timer; a BaseException, so that a reward's `except Exception` does not catch it."""


class InlineRunner:
    """Reward calls in the calling process, with a best-effort limit (see the module docstring)."""

    def __init__(self, functions: list[RewardFunction], labels: list[str], timeout_s: float):
        self.functions, self.labels, self.timeout_s = functions, labels, timeout_s

    def _interruptible(self) -> bool:
        return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()

    def _call(self, term_index: int, completion: str, example: PromptExample) -> Outcome:
        function, label = self.functions[term_index], self.labels[term_index]
        if not self._interruptible():
            return call_reward(function, label, completion, example)

        armed = [True]

        def interrupt(signum, frame):
            if armed[0]:  # a timer that fires as the call returns must not interrupt what follows
                raise _CallTimedOut

        previous = signal.signal(signal.SIGALRM, interrupt)
        signal.setitimer(signal.ITIMER_REAL, self.timeout_s)
        try:
            outcome = call_reward(function, label, completion, example)
            armed[0] = False
            return outcome
        except _CallTimedOut:
            return TIMEOUT
        finally:
            armed[0] = False
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)

    def run(self, calls: list[Call]) -> list[Outcome]:
        outcomes: list[Outcome] = [None] * len(calls)
        for index, (term_index, completion, example) in enumerate(calls):
            started = time.monotonic()
            outcome = self._call(term_index, completion, example)
            if time.monotonic() - started > self.timeout_s:
                outcome = TIMEOUT
            outcomes[index] = outcome
            if isinstance(outcome, CallFailed):
                break
        return outcomes

    def close(self) -> None:
        pass
