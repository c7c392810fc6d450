"""Orbax CheckpointManager behind a thin wrapper: keeps the latest and the best checkpoint.

A checkpoint holds the whole TrainState (step, params, batch_stats, optimizer state). Restores
take an abstract tree built from a template state, so arrays come back with the template's
shardings (replicated over the training mesh, or on one device for evaluation).
"""

import os

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as keep

from jaxcell.errors import UserError

BEST_METRIC = "val_accuracy"


class Checkpoints:
    def __init__(self, directory: str, read_only: bool = False):
        self.directory = os.path.abspath(directory)
        policy = keep.AnyPreservationPolicy([
            keep.LatestN(1),
            keep.BestN(get_metric_fn=lambda m: m[BEST_METRIC], reverse=False, n=1,
                       keep_checkpoints_without_metrics=False),
        ])
        # best_fn as well: without it Orbax records no metrics with a checkpoint and best_step()
        # answers the latest one (the policy alone kept the best checkpoint, but nothing found it).
        options = ocp.CheckpointManagerOptions(preservation_policy=policy, read_only=read_only,
                                               create=not read_only, best_fn=lambda m: m[BEST_METRIC],
                                               best_mode="max")
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, state, metrics: dict | None = None, force: bool = False) -> None:
        if jax.process_count() == 1:
            # Host copies: Orbax writes a replicated jax.Array a slice per device (every process takes its
            # share of the replicas), compiling a slice program per shape, which on one host buys nothing.
            state = jax.device_get(state)
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)),
                          metrics=metrics, force=force)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        return self.manager.best_step() or self.manager.latest_step()

    def restore(self, template, which: str | int = "best", partial: bool = False):
        """Restore into the structure and shardings of `template` ("best", "last" or a step); the
        template may be arrays or jax.ShapeDtypeStruct with shardings. partial: the template may
        name a subset of what was saved (inference needs no optimizer state)."""
        self.manager.wait_until_finished()
        step = {"best": self.best_step, "last": self.latest_step}.get(which, lambda: which)()
        if step is None:
            raise UserError(f"no checkpoint in {self.directory}")
        if step not in self.manager.all_steps():
            raise UserError(f"no checkpoint for step {step} in {self.directory}; "
                            f"there are: {self.manager.all_steps()}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        if partial:  # StandardRestore has no partial mode; PyTreeRestore reads the same files
            restore = ocp.args.PyTreeRestore(abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                                             partial_restore=True)
        else:
            restore = ocp.args.StandardRestore(abstract)
        restored = self.manager.restore(step, args=ocp.args.Composite(state=restore))
        return restored.state

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
