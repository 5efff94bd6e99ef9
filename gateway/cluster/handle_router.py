"""Serve's handle router loop, stopped before Ray is shut down in this process.

Ray Serve (2.60) routes every ``DeploymentHandle`` call of a process on one event loop in a
daemon thread (``SingletonThreadRouter``), created on the first call and never stopped. A
task on it (Serve's ``EventLoopMonitor``) records Ray metrics every few seconds, and the
handles' long-poll clients wait on the controller there: ``serve.shutdown()`` and
``ray.shutdown()`` leave all of it running, calling into a core worker that is gone
(ray-project/ray#31145: threads that use Ray across a shutdown can crash the process). Our
test process, which starts and stops a local Ray per test module, once ended in a
segmentation fault after its last test with that thread still alive. A process that owns
its Ray instance (``--cluster local``, the tests) stops the loop between
``serve.shutdown()`` (which shuts the cached handles down on that loop) and
``ray.shutdown()``: its tasks are cancelled, the loop stops and is closed, and the next Ray
session's first handle call makes a new one. Handles of the session cannot be used after it
(their routers hold no loop of their own).
"""

from __future__ import annotations

import asyncio
import time

STOP_TIMEOUT_S = 5.0


def stop_handle_router(timeout_s: float = STOP_TIMEOUT_S) -> bool:
    """Stop this process's Serve router loop, if one runs; True when one was stopped. Call
    after ``serve.shutdown()``, before ``ray.shutdown()``."""
    try:
        from ray.serve._private.router import SingletonThreadRouter
    except ImportError:
        return False
    lock = getattr(SingletonThreadRouter, "_asyncio_loop_creation_lock", None)
    if lock is None:  # another Serve layout: nothing of ours to stop
        return False
    with lock:
        loop: asyncio.AbstractEventLoop | None = getattr(SingletonThreadRouter, "_asyncio_loop", None)
        monitor = getattr(SingletonThreadRouter, "_event_loop_monitor", None)
        SingletonThreadRouter._asyncio_loop = None
        SingletonThreadRouter._event_loop_monitor = None
    if loop is None or loop.is_closed():
        return False
    deadline = time.monotonic() + timeout_s
    if loop.is_running():
        future = asyncio.run_coroutine_threadsafe(_cancel_tasks(monitor), loop)
        try:
            future.result(timeout=timeout_s)
        except Exception:  # noqa: BLE001 - a task that would not end: the loop stops regardless
            future.cancel()
        loop.call_soon_threadsafe(loop.stop)
        while loop.is_running() and time.monotonic() < deadline:
            time.sleep(0.005)
    if not loop.is_running():
        loop.close()
    return True


async def _cancel_tasks(monitor: object | None) -> None:
    stop = getattr(monitor, "stop", None)
    if callable(stop):
        stop()
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
