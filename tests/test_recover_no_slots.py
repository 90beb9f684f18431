"""A restart whose new stages fail to start leaves the pipeline down with no stage; `recover_if_down`
(the router daemon's, when a worker joins) starts the shape it meant to run again, in a new epoch."""

import pytest

from flexpipe.api import FlexPipe, plan_shape
from flexpipe.errors import PipelineDown, ReshapeError
from tests.pipeline_helpers import check_against_oracle, request_mix, run_all

pytestmark = pytest.mark.timeout(120)


async def test_a_pipeline_down_with_no_stage_starts_again_when_recovered():
    async with FlexPipe.launch("tiny", stages=2, in_process=True) as fp:
        ctl = fp.controller
        target = plan_shape(fp.config, 3, None, 0, "cpu")
        ctl.fail_next_launch = True   # one of the restart's three stages fails to load its weights
        with pytest.raises(ReshapeError, match="failed to start"):
            await ctl.restart(target, drain=False)
        assert ctl.slots == [] and fp.router.down is not None
        with pytest.raises(PipelineDown):
            await fp.complete("refused while down", max_tokens=3)

        # a start again that fails as well: still down, saying why, and nothing raised
        ctl.fail_next_launch = True
        await ctl.recovery.recover_if_down("test: first try")
        assert ctl.slots == [] and "failed to start" in fp.router.down
        assert ctl.history[-1].kind == "rebuild" and not ctl.history[-1].ok

        await ctl.recovery.recover_if_down("test: capacity back")
        st = ctl.history[-1]
        assert st.ok and st.kind == "rebuild" and fp.router.down is None
        # the shape the failed restart meant to run, in an epoch after both failed tries (1 and 2)
        assert ctl.shape.boundaries == target.boundaries and ctl.shape.epoch == st.to_epoch == 3
        assert len(ctl.slots) == 3 and fp.status()["router"]["epoch"] == 3
        reqs = request_mix(6, seed=21, max_tokens=(10, 30))
        check_against_oracle(fp, reqs, await run_all(fp, reqs))


async def test_a_reshape_of_a_pipeline_down_with_no_stage_serves_again():
    """fp.reshape() of a pipeline a failed restart left with no stage starts it (as a cold start):
    the router served again only if that start also lifted its refusal (router.down)."""
    async with FlexPipe.launch("tiny", stages=2, in_process=True) as fp:
        ctl = fp.controller
        ctl.fail_next_launch = True
        with pytest.raises(ReshapeError, match="failed to start"):
            await ctl.restart(plan_shape(fp.config, 3, None, 0, "cpu"), drain=False)
        assert ctl.slots == [] and fp.router.down is not None
        st = await fp.reshape(stages=2)
        assert st.ok and len(ctl.slots) == 2 and fp.router.down is None
        reqs = request_mix(4, seed=5, max_tokens=(8, 16))
        check_against_oracle(fp, reqs, await run_all(fp, reqs))
