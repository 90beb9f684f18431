"""A restart whose stages fail to start leaves the embedded pipeline down with no stage (router.down):
that is not a scale to zero.  `suspended` is False, status() says the shape does not run and the
autoscaler reports the down state, and the autoscaler starts the pipeline again (recover_if_down),
waiting retry_s after a failed try, doubling."""

import asyncio
import math
import time

import pytest

from flexpipe.api import FlexPipe, plan_shape
from flexpipe.errors import PipelineDown, ReshapeError
from flexpipe.model.config import ModelConfig
from flexpipe.model.units import unit_costs
from flexpipe.planning import PolicyConfig
from flexpipe.runtime.autoscale import AutoscaleConfig, MeasuredPerfModel

pytestmark = pytest.mark.timeout(120)


def _autoscale(tick_s: float) -> AutoscaleConfig:
    # a fixed model of the machine (no calibration): these tests are about the down state, not speed
    perf = MeasuredPerfModel(unit_costs(ModelConfig.preset("tiny"), 4), fixed_s=2e-3, per_token_s=5e-5, hop_s=2e-4,
                             kv_tokens=16384)
    # no fewer stages than the 2 it starts with, at its budget: an idle loop keeps them (it reshapes nothing
    # before the restart, which would take the failure fail_next_launch is set for)
    policy = PolicyConfig(stage_counts=(2, 3), token_budgets=(64,), max_gpus=3)
    return AutoscaleConfig(policy=policy, tick_s=tick_s, perf=perf, max_stages=3, retry_s=5.0)


async def _fail_restart(fp: FlexPipe) -> None:
    """Restart as 3 stages, one of which fails to load: the pipeline is left down with no stage."""
    fp.controller.fail_next_launch = True
    with pytest.raises(ReshapeError, match="failed to start"):
        await fp.controller.restart(plan_shape(fp.config, 3, None, 0, "cpu"), drain=False)
    assert fp.controller.slots == [] and fp.router.down is not None


async def test_a_pipeline_down_with_no_stage_is_not_scaled_to_zero_and_the_autoscaler_starts_it():
    # tick_s of an hour: the loop's own ticks never come; the test ticks by hand
    async with FlexPipe.launch("tiny", stages=2, in_process=True, autoscale=_autoscale(3600.0)) as fp:
        assert fp.status()["shape"]["running"] is True
        await _fail_restart(fp)
        assert not fp.controller.suspended
        s = fp.status()
        assert s["stages"] == [] and s["shape"]["running"] is False
        assert not s["autoscale"]["scaled_to_zero"] and "failed to start" in s["autoscale"]["down"]
        with pytest.raises(PipelineDown):
            await fp.complete("refused while down", max_tokens=2)

        entry = await fp.autoscaler.tick()
        assert entry["action"] == "recover" and entry["ok"], entry
        assert fp.router.down is None and len(fp.controller.slots) == 3
        s = fp.status()
        assert s["shape"]["running"] is True and len(s["stages"]) == 3 and s["autoscale"]["down"] is None
        assert s["decisions"][-1]["action"] == "recover"
        out = await fp.complete("served again", max_tokens=3, ignore_eos=True)
        assert out.completion_tokens == 3


async def test_the_autoscaler_waits_retry_s_doubling_between_failed_tries():
    async with FlexPipe.launch("tiny", stages=2, in_process=True, autoscale=_autoscale(3600.0)) as fp:
        auto, ctl = fp.autoscaler, fp.controller
        t = [auto.clock()]
        auto.clock = lambda: t[0]   # (only the recovery path runs: the policy never sees this clock)
        await _fail_restart(fp)

        ctl.fail_next_launch = True
        entry = await auto.tick()
        assert entry["action"] == "recover" and not entry["ok"] and "still down" in entry["applied"], entry
        tries = len(ctl.history)
        t[0] += 4.9                     # within retry_s (5 s): no new try
        assert await auto.tick() is None and len(ctl.history) == tries
        t[0] += 0.2
        ctl.fail_next_launch = True
        entry = await auto.tick()
        assert not entry["ok"] and len(ctl.history) == tries + 1
        t[0] += 9.9                     # the wait doubled: 10 s
        assert await auto.tick() is None and len(ctl.history) == tries + 1
        t[0] += 0.2
        entry = await auto.tick()
        assert entry["ok"] and fp.router.down is None and len(ctl.slots) == 3
        assert auto._backoff_until == -math.inf and fp.status()["autoscale"]["errors"] == 0


async def test_the_autoscale_loop_brings_a_pipeline_down_with_no_stage_back_by_itself():
    async with FlexPipe.launch("tiny", stages=2, in_process=True, max_batch_tokens=64, autoscale=_autoscale(0.1)) as fp:
        await _fail_restart(fp)
        deadline = time.monotonic() + 60
        while fp.router.down is not None or not fp.controller.slots:
            assert time.monotonic() < deadline, "the autoscaler did not start the pipeline again within 60 s"
            await asyncio.sleep(0.05)
        first = fp.status()["decisions"][0]
        assert first["action"] == "recover" and first["ok"], first
        out = await fp.complete("served again", max_tokens=3, ignore_eos=True)
        assert out.completion_tokens == 3


async def test_the_autoscaler_recovers_a_pipeline_down_with_its_stages_once_the_weights_are_back(tmp_path):
    # a recovery that failed (the dead stage's replacement could not load its checkpoint, gone from disk)
    # leaves the pipeline down with its other stage still running; the policy used to plan a reshape of it,
    # which fails the same way. The autoscaler runs the recovery again instead: once the checkpoint is
    # back, the pipeline serves the oracle's tokens
    import os
    import shutil
    import signal

    from flexpipe.model import PresetWeights, preset, save_checkpoint

    path, saved = tmp_path / "model", tmp_path / "saved"
    save_checkpoint(preset("tiny"), PresetWeights(preset("tiny"), 0), path)
    shutil.copytree(path, saved)
    async with FlexPipe.launch(str(path), stages=2, autoscale=_autoscale(3600.0)) as fp:
        shutil.rmtree(path)
        os.kill(fp.status()["stages"][1]["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 60
        while fp.router.down is None:   # the router notices the death and its recovery fails
            assert time.monotonic() < deadline, "the recovery did not fail"
            await asyncio.sleep(0.05)
        assert fp.controller.slots and not fp.controller.suspended
        shutil.copytree(saved, path)
        entry = await fp.autoscaler.tick()
        assert entry["action"] == "recover" and entry["ok"], entry
        out = await fp.complete("served again", max_tokens=4, ignore_eos=True)
        assert out.token_ids == fp.reference_tokens("served again", max_tokens=4, ignore_eos=True)
