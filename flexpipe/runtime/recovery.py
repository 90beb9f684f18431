"""Stages that die, and pipelines started again: the controller's failure recovery and restarts.

- During a reshape, its waits on the stages end as soon as one of them dies (`unless_a_stage_dies`):
  a copy to a dead peer would otherwise wait for its ask's timeout while holding the controller's
  lock, which the recovery of that very death needs.  The reshape aborts; the recovery runs next.
  A death counts once anyone in this process knows of it: the client (the stage's process exited,
  a daemon's worker reported it) or the router (its monitors and heartbeats), which declares it to
  the whole process (`on_stage_death`).
- Outside a reshape, the router reports a dead stage (`on_stage_death`, from its monitors and
  heartbeats).  Every stage dead by then is replaced by a new process serving the same range on the
  same device (or where the stage launcher starts it: the router daemon's moves it off a device
  whose worker is gone, and the shape names that device from then on), every stage drops its KV, the
  pipeline moves to the next epoch and every request is recomputed from the router's record
  (DESIGN.md: nothing lost).  When that fails, every request fails at once and the router refuses
  new ones (router.down) until a later recovery succeeds: the next death of a stage, or
  `recover_if_down` (the router daemon's, when a worker joins).
- `restart` (the drain-and-restart and restart-and-recompute baselines) and `rebuild` (also what a
  reshape does that failed half way through its switch) stop the stages, start the shape in fresh
  processes and recompute every request.

Each records a ReshapeStats in the controller's history ("recovery", "rebuild", "drain-restart",
"restart-recompute").
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from flexpipe.errors import ActorError, ReshapeError
from flexpipe.partition import PipelineShape
from flexpipe.runtime.cache import CacheManager
from flexpipe.runtime.controller import Controller, ReshapeStats, Slot, to_the_end
from flexpipe.runtime.messages import ActorRef
from flexpipe.runtime.stage import Activate, ResetKV

log = logging.getLogger("flexpipe.controller")   # (part of the controller: its log)

RELAUNCH_ATTEMPTS = 3   # new processes tried for one dead stage
RESET_PASSES = 3        # replace-and-reset passes of one recovery (a stage may die during the reset)
DRAIN_POLL_S = 0.005    # how often a drain-and-restart looks whether the running requests are done



def _abandon(task: "asyncio.Future[Any]") -> None:
    """Cancel what nobody will await any more, and take its outcome when it ends: a gather cancelled
    this way ends with a CancelledError as its exception, which asyncio logged as "never retrieved"."""
    task.cancel()
    task.add_done_callback(lambda t: t.cancelled() or t.exception())

class Recovery:
    """Stage failure and restart for one Controller (see the module's docstring).

    It changes the controller's pipeline (slots, shape, history, the router's pipeline and KV
    ledger) under the controller's lock, as the controller's reshapes do, and starts and wires stages
    through the controller's own steps (_launch, _launch_all, _configure, _pipeline, _pools,
    _next_ref, _upstream): the controller stays the one owner of the shape.  The controller hands
    the router `on_stage_death` and the actor system `actor_died`, and sets `involved` while a
    reshape runs.
    """

    def __init__(self, controller: Controller):
        self.ctl = controller
        # the stages a running reshape depends on, and the futures its waits resolve when one dies
        self.involved: set[ActorRef] = set()
        self._death_waiters: set[asyncio.Future] = set()

    # ---- noticing a dead stage -----------------------------------------------------------------------
    def is_dead(self, ref: ActorRef) -> bool:
        """Whether `ref` is known dead: to this process's client (its process exited) or to the router
        (it missed its heartbeats)."""
        ctl = self.ctl
        router_dead = getattr(ctl.router.ctx, "is_dead", None) if ctl.router is not None else None
        return ctl.system.client.is_dead(ref) or (router_dead is not None and router_dead(ref))

    def actor_died(self, ref: ActorRef, reason: str) -> None:
        """The actor system's death listener: end the waits of a reshape that `ref` is part of."""
        if ref in self.involved:
            for fut in self._death_waiters:
                if not fut.done():
                    fut.set_result(f"{ref} died: {reason}")

    async def unless_a_stage_dies(self, aw: Any) -> Any:
        """Await `aw`, or raise ReshapeError as soon as a stage of the reshape dies.

        A stage's copy to a peer that died would wait for its ask's timeout (30 s by default), holding
        the lock that the recovery of that very death waits for."""
        task = asyncio.ensure_future(aw)
        died = asyncio.get_running_loop().create_future()
        gone = next((r for r in self.involved if self.is_dead(r)), None)
        if gone is not None:   # before this wait began (to the client, or to the router only)
            died.set_result(f"{gone} is dead")
        self._death_waiters.add(died)
        try:
            await asyncio.wait({task, died}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:   # cancelled (the reshape is): so is what it waited for
            _abandon(task)
            raise
        finally:
            self._death_waiters.discard(died)
        if task.done() and not died.done():
            return task.result()
        _abandon(task)
        raise ReshapeError(f"a stage died during the reshape: {died.result()}")

    # ---- replacing it ----------------------------------------------------------------------------------
    async def on_stage_death(self, ref: ActorRef, reason: str) -> None:
        """The router's hook for a dead stage: recover, or fail every request saying why.

        First the death is made known to the whole process (the controller's client included): the
        router may know of it alone (the stage's own goodbye to its watchers, or its missed
        heartbeats), and a reshape holding the lock this recovery waits for would otherwise go on
        asking the dead stage, each ask waiting for its timeout (30 s and more).  Declared, every ask
        to it fails at once and the reshape's waits end (`actor_died`): it aborts, and this runs."""
        ctl = self.ctl
        declare = getattr(ctl.system, "declare_dead", None)
        if declare is not None:
            declare(ref, reason)
        else:
            self.actor_died(ref, reason)
        async with ctl._lock:
            if all(sl.ref != ref for sl in ctl.slots):
                return  # already replaced
            try:
                await self.recover(ref, reason)
            except Exception as e:  # noqa: BLE001 - whatever it was, clients must not wait for ever
                log.error("recovery from the death of %s failed: %s: %s", ref, type(e).__name__, e)
                ctl.router.fail_all(f"stage {ref} died ({reason}) and recovery failed: {type(e).__name__}: {e}")

    async def recover_if_down(self, why: str) -> None:
        """Run the recovery again if an earlier one failed and left the pipeline down (router.down):
        `why` (a worker joined) may have brought back the capacity it lacked.  Nothing when it serves.

        A restart or rebuild that could not start its stages left none: the shape it meant to run
        (ctl.shape, see rebuild) starts again from scratch, in a new epoch.  When that fails too, the
        pipeline stays down, saying why."""
        ctl = self.ctl
        async with ctl._lock:   # (after a recovery running now, which may yet fail)
            down = ctl.router.down if ctl.router is not None else None
            if down is None or ctl.closed:
                return
            if not ctl.slots:
                t0 = time.perf_counter()
                old = ctl.shape
                shape = old.with_epoch(old.epoch + 1)
                log.warning("the pipeline is down with no stage (%s); %s: starting it again as %s", down, why,
                            list(shape.boundaries))
                st = ReshapeStats("rebuild", old.epoch, shape.epoch, [], shape.boundaries, error=f"down: {down}")
                try:   # (fail_all left the router paused with no step in flight: quiesced, as rebuild needs)
                    await self.rebuild_or_down(shape, [], st, t0, f"starting the pipeline again as "
                                                                   f"{list(shape.boundaries)} ({why})")
                except Exception as e:  # noqa: BLE001 - down, saying why (router.down): the next call may succeed
                    log.error("the pipeline stays down: %s: %s", type(e).__name__, e)
                return
            # a stage still dead (its replacement failed), else the first: every stage is then reset
            dead = next((sl.ref for sl in ctl.slots if self.is_dead(sl.ref)), ctl.slots[0].ref)
        log.warning("the pipeline is down (%s); %s: recovering it again", down, why)
        await self.on_stage_death(dead, f"down until {why}")

    async def _replace(self, i: int, epoch: int, reason: str) -> None:
        """Start a new process for slot i, whose stage died (RELAUNCH_ATTEMPTS attempts)."""
        ctl = self.ctl
        sl = ctl.slots[i]
        try:  # a stage declared dead by heartbeats may still be running, hung: make sure it is gone
            sl.handle.kill()
        except Exception as e:  # already gone, or its worker is
            log.debug("recovery: kill of %s: %s", sl.ref, e)
        for attempt in range(RELAUNCH_ATTEMPTS):
            try:
                ctl.slots[i] = await ctl._launch(sl.start, sl.end, sl.device, epoch, i)
                return
            except ActorError as e:
                log.error("recovery: relaunch of stage %d failed (attempt %d): %s", i, attempt + 1, e)
        raise ReshapeError(f"stage {i} could not be restarted after it died ({reason})")

    async def recover(self, dead: ActorRef, reason: str) -> ReshapeStats:
        """Replace the dead stages with new processes and recompute every request from its record
        (with the controller's lock held)."""
        ctl = self.ctl
        t0 = time.perf_counter()
        router = ctl.router
        old = ctl.shape
        shape = old.with_epoch(old.epoch + 1)
        st = ReshapeStats("recovery", old.epoch, shape.epoch, old.boundaries, shape.boundaries, error=reason)
        router._paused = True
        st.requests_recomputed = router.requeue_all()
        rr = ctl.router_actor.ref
        # Every stage that is dead by now, not only `dead`: stages die together (a node, a signal to
        # a process group), and one left in place fails the reset of the others.  Another may die
        # while they are reset: it is replaced in the next pass.
        for attempt in range(RESET_PASSES):
            for i, sl in enumerate(ctl.slots):
                if sl.ref == dead or self.is_dead(sl.ref):
                    await self._replace(i, shape.epoch, reason)
                    st.stages_started += 1
            res = await asyncio.gather(*(ctl.system.ask(sl.ref, ResetKV(shape.epoch)) for sl in ctl.slots),
                                       return_exceptions=True)
            if not any(isinstance(r, BaseException) for r in res):
                # The last stage first: a stage's Activate opens its hop channel to the next one
                # (OpenHop), which a stage that lived on takes only from the upstream its own Activate
                # named; gathered, a replaced upstream's OpenHop could come first, and was refused.
                res = []
                for j in reversed(range(len(ctl.slots))):
                    sl = ctl.slots[j]
                    try:
                        await ctl.system.ask(sl.ref, Activate(shape.epoch, j, sl.start, sl.end, ctl._next_ref(j), rr,
                                                              ctl._upstream(j)))
                    except Exception as e:  # noqa: BLE001 - raised below, or the pass is run again
                        res.append(e)
                        break
            err = next((r for r in res if isinstance(r, BaseException)), None)
            if err is None:
                break
            if attempt == RESET_PASSES - 1 or not any(self.is_dead(sl.ref) for sl in ctl.slots):
                raise err
            log.warning("recovery: a stage died while the pipeline was reset (%s): replacing it too", err)
        ctl.shape = ctl._running_shape(shape.epoch)   # (a stage replaced on another device is named there)
        cache = CacheManager(ctl.settings.block_size, ctl._pools(shape))
        router.switch(ctl._pipeline(shape.epoch), cache)
        router.down = None   # (it went down when an earlier recovery failed: it serves again)
        router.resume()
        st.pause_s = st.total_s = time.perf_counter() - t0
        ctl.history.append(st)
        log.warning("recovered from the death of %s in %.2f s; %d requests recomputed", dead, st.total_s,
                    st.requests_recomputed)
        return st

    # ---- starting the pipeline again ---------------------------------------------------------------------
    async def restart(self, shape: PipelineShape, *, drain: bool) -> ReshapeStats:
        """Rebuild the pipeline from scratch: the baselines of benchmarks/bench_reshape.py.

        drain=True  (drain-and-restart): stop admitting, let running requests finish, rebuild.
        drain=False (restart-and-recompute): stop at once, rebuild, re-prefill every running request.
        """
        ctl = self.ctl
        async with ctl._lock:
            router = ctl.router
            old = ctl.shape
            shape = shape.with_epoch(old.epoch + 1)
            st = ReshapeStats("drain-restart" if drain else "restart-recompute", old.epoch, shape.epoch,
                              old.boundaries, shape.boundaries)
            t0 = time.perf_counter()
            try:
                if drain:
                    router.sched.admit = False
                    router._wake.set()
                    while router.sched.running or router.sched.inflight:
                        await asyncio.sleep(DRAIN_POLL_S)
                await router.quiesce()
            except BaseException:  # (a stage that died meanwhile: its recovery pauses the router again)
                router.resume()
                raise
            finally:
                router.sched.admit = True
            try:
                return await self.rebuild_or_down(shape, ctl.slots, st, t0, f"the restart as {list(shape.boundaries)}")
            except Exception as e:  # noqa: BLE001 - the old stages are gone: nothing left to serve with
                raise e if isinstance(e, ReshapeError) else ReshapeError(
                    f"restart as {list(shape.boundaries)} failed, the pipeline is down: {st.error}") from e

    async def rebuild_or_down(self, shape: PipelineShape, retire: list[Slot], st: ReshapeStats, t0: float,
                               what: str) -> ReshapeStats:
        """rebuild() to its end; when it fails, record `st` as failed, fail every request and refuse new
        ones (router.down, saying that `what` failed: no stage is left to serve with), and raise."""
        try:
            return await to_the_end(self.rebuild(shape, retire, st, t0))
        except Exception as e:
            st.ok, st.error = False, f"{type(e).__name__}: {e}"
            st.total_s = time.perf_counter() - t0
            self.ctl.history.append(st)
            self.ctl.router.fail_all(f"{what} failed: {st.error}")
            raise

    async def rebuild(self, shape: PipelineShape, retire: list[Slot], st: ReshapeStats,
                      t0: float | None = None) -> ReshapeStats:
        """With the router quiesced (and the controller's lock held): stop `retire`, start `shape` (in
        its epoch) in fresh processes, and recompute every request from its record.

        From the moment the old stages are stopped ctl.shape is `shape`, the shape the controller means
        to run: when its stages fail to start, none is left, and `recover_if_down` starts it again."""
        ctl = self.ctl
        router = ctl.router
        t0 = time.perf_counter() if t0 is None else t0
        st.to_epoch = shape.epoch
        st.requests_recomputed = router.requeue_all()
        await asyncio.gather(*(sl.handle.stop() for sl in retire), return_exceptions=True)
        st.stages_retired = len(retire)
        ctl.slots, ctl.shape = [], shape   # (none runs: the shape meant, as after a scale to zero)
        slots = await ctl._launch_all({i: ctl._launch(s.start, s.end, s.device, shape.epoch, i)
                                       for i, s in enumerate(shape.stages)}, "rebuild")
        ctl.slots = [slots[i] for i in range(len(shape.stages))]
        st.stages_started = len(ctl.slots)
        st.weight_bytes = ctl._param_bytes_list(range(ctl.spec.config.num_units))
        ctl.shape = ctl._running_shape(shape.epoch)
        await ctl._configure(shape.epoch)
        router.switch(ctl._pipeline(shape.epoch), CacheManager(ctl.settings.block_size, ctl._pools(shape)))
        router.down = None   # (when an earlier restart or recovery failed: it serves again)
        router.resume()
        st.pause_s = st.total_s = time.perf_counter() - t0
        ctl.history.append(st)
        return st


__all__ = ["Recovery"]
