"""``python -m tests.distributed_helper apply ...``: the ``compressor`` command with two more steps:
``undistributed`` (a data-dependent step without ``distributes``) and ``die_at``, which SIGKILLs the rank
that ``COMPRESSOR_TEST_DIE=RANK:BLOCK`` names when it reaches that block, or hangs the one
``COMPRESSOR_TEST_HANG=RANK:BLOCK`` names; ``COMPRESSOR_TEST_DIE_STEP=RANK:STEP`` SIGKILLs that rank as it
starts training step STEP (counted from 1) of ``distill.train_end_to_end``, which then commits after every step
(test only)."""

import os
import signal
import time
from dataclasses import dataclass

import compressor.recipe
from compressor.step import Step, param, register_step


@register_step("die_at")
@dataclass
class DieAt(Step):
    """Test only: does nothing, unless COMPRESSOR_TEST_DIE names this rank and block."""

    needs_calibration = False
    note: str = param("", "unused")

    def compress_block(self, context) -> None:
        here = f"{os.environ.get('RANK', '0')}:{context.index}"
        if os.environ.get("COMPRESSOR_TEST_DIE") == here:
            os.kill(os.getpid(), signal.SIGKILL)
        if os.environ.get("COMPRESSOR_TEST_HANG") == here:
            time.sleep(3600)


@register_step("undistributed")
@dataclass
class Undistributed(Step):
    """Test only: a data-dependent step that declares no way to distribute, so it refuses --nproc > 1."""

    note: str = param("", "unused")

    def compress_block(self, context) -> None:
        pass


compressor.recipe.shipped_catalogue = compressor.recipe.catalogue  # the live catalogue knows die_at, undistributed


def die_in_training(rank_and_step: str) -> None:
    import compressor.distill
    import compressor.resume

    rank, step = rank_and_step.split(":")
    compressor.resume.Commits.every_seconds = 0.0
    taken, calls = compressor.distill.optimizer_step, []

    def optimizer_step(*arguments, **options):
        calls.append(1)
        if os.environ.get("RANK", "0") == rank and len(calls) == int(step):
            os.kill(os.getpid(), signal.SIGKILL)
        return taken(*arguments, **options)

    compressor.distill.optimizer_step = optimizer_step


if os.environ.get("COMPRESSOR_TEST_DIE_STEP"):
    die_in_training(os.environ["COMPRESSOR_TEST_DIE_STEP"])

if __name__ == "__main__":
    from compressor.cli import main

    main()
