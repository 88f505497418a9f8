"""`python -m trainer` that SIGKILLs itself at a chosen point (fault injection for the tests).

usage: python tests/fault_driver.py POINT N [trainer overrides...]

POINT is where the N-th event kills the process, with no chance to clean up:
  step        before the N-th training step of this process
  checkpoint  inside the N-th save of checkpoints/last: the new files are written, the manager
              has not yet recorded them (the last moment of a save)
  export      inside the export, after both SavedModels were written (N-th time)
"""

from __future__ import annotations

import os
import signal
import sys


def kill_on(n: int):
    calls = {"n": 0}

    def maybe_die(*_):
        calls["n"] += 1
        if calls["n"] == n:
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    return maybe_die


def main() -> None:
    point, n = sys.argv[1], int(sys.argv[2])
    sys.argv = ["trainer", *sys.argv[3:]]
    die = kill_on(n)
    if point == "step":
        from trainer.training.loop import Loop

        train_step = Loop.train_step
        Loop.train_step = lambda self, it: (die(), train_step(self, it))[1]
    elif point == "checkpoint":
        import tensorflow as tf

        save = tf.train.CheckpointManager.save

        def save_then_die(self, checkpoint_number=None, check_interval=True, options=None):
            if not self.directory.endswith("last"):
                return save(self, checkpoint_number, check_interval, options)
            # Our callback runs before the manager's own, which records the new checkpoint.
            options = tf.train.CheckpointOptions(experimental_write_callbacks=[die])
            return save(self, checkpoint_number, check_interval, options)

        tf.train.CheckpointManager.save = save_then_die
    elif point == "export":
        from trainer.serving import savedmodel as export

        save_keras = export.save_keras
        export.save_keras = lambda model, path: (die(), save_keras(model, path))[1]
    else:
        raise SystemExit(f"unknown POINT {point!r}; use step, checkpoint or export")
    from trainer.__main__ import main as trainer_main

    trainer_main()


if __name__ == "__main__":
    main()
