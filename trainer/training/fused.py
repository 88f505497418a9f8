"""Keras' optimizers with each variable's update in one fused TensorFlow kernel.

Why hand-written (#20): Keras 3 writes every variable's update as separate graph ops (about 45
per variable for AdamW, the learning-rate schedule evaluated again for each variable's weight
decay): 11,300 of the 18,700 ops of an XXS training step. Tracing them, and grappler's passes
over them, were most of the time to the first step (bench/first_step.py: 10-11 s -> 4.5-5.0 s;
steady steps are about as fast either way: grappler merges the repeated scalars). TensorFlow's
own training kernels (`ResourceApplyAdam`, `ResourceApplyKerasMomentum`) compute the same formulas, in the
same order, as one op per variable; the step's shared scalars (learning rate, beta powers) are
computed once. Keras still owns everything else: slots, schedules, clipping, loss scaling, EMA,
checkpointed state. Lion and LAMB have no fused kernel: they keep Keras' update (with the
once-per-step weight decay).

Layer-wise learning-rate decay (`lr_factors`, a variable path -> factor) multiplies a variable's
rate in its update and its decoupled weight decay: no Keras or TF API offers per-variable rates.
"""

from __future__ import annotations

import keras
import tensorflow as tf


class FusedUpdates:
    """Mixin before a Keras optimizer class; subclasses give `_fused_update`."""

    lr_factors: dict[str, float] = {}
    _step_lr = _step_scalars = None  # this step's scalars, while the update is being traced

    def _factor(self, variable) -> float:
        if not self.lr_factors:
            return 1.0
        built = self._trainable_variables[self._get_variable_index(variable)]
        return self.lr_factors.get(built.path, 1.0)

    def _apply_weight_decay(self, variables):
        """Done in `update_step`, each variable just before its own update: the same arithmetic
        as Keras' separate pass (v -= v x lr x wd; a variable's update reads only itself), in
        half the per-variable `tf.distribute` updates to trace."""

    def _decay(self, variable, lr) -> None:
        if self.weight_decay is None or not self._use_weight_decay(variable):
            return
        if self._step_lr is None or variable.dtype != tf.float32:  # Keras' own arithmetic
            variable.assign_sub(variable * tf.cast(lr * self.weight_decay, variable.dtype))
            return
        # v -= v x (lr x wd) as one kernel (`ResourceApplyGradientDescent`: var -= alpha x
        # delta, the same product and subtraction), lr x wd formed once per rate: 2 ops per
        # variable instead of 6 (about 1,000 fewer in an XXS step to trace and optimise).
        factor = ("decay", self._factor(variable))
        if factor not in self._scaled_lr:
            self._scaled_lr[factor] = lr * tf.constant(self.weight_decay, tf.float32)
        handle = variable.handle
        tf.raw_ops.ResourceApplyGradientDescent(
            var=handle, alpha=self._scaled_lr[factor],
            delta=tf.raw_ops.ReadVariableOp(resource=handle, dtype=tf.float32))

    def _distributed_tf_update_step(self, distribution, grads_and_vars, learning_rate):
        # `learning_rate` is per replica here: the schedule again, once, in cross-replica context.
        self._step_lr = tf.cast(self.learning_rate, tf.float32)
        self._step_scalars, self._scaled_lr = self._shared_scalars(), {}
        try:
            super()._distributed_tf_update_step(distribution, grads_and_vars, learning_rate)
        finally:
            self._step_lr = self._step_scalars = self._scaled_lr = None

    def _shared_scalars(self) -> dict:
        return {}

    def _lr_for(self, variable):
        """The step's rate times the variable's layer-decay factor (one op per factor)."""
        if self._step_lr is None:  # outside `_distributed_tf_update_step`: Keras' own rate
            return tf.cast(self.learning_rate, tf.float32) * self._factor(variable)
        factor = self._factor(variable)
        if factor not in self._scaled_lr:
            self._scaled_lr[factor] = self._step_lr * factor if factor != 1.0 else self._step_lr
        return self._scaled_lr[factor]

    def update_step(self, gradient, variable, learning_rate):
        lr = self._lr_for(variable)
        self._decay(variable, lr)
        fusable = self._step_scalars is not None and variable.dtype == tf.float32
        if fusable and self._fused_update(tf.cast(gradient, tf.float32), variable, lr):
            return
        super().update_step(gradient, variable, lr)

    def _fused_update(self, gradient, variable, lr) -> bool:
        return False


def _handle(slot: keras.Variable):
    """The resource handle of an optimizer slot (the current device's copy, in an update)."""
    return slot.value.handle


class FusedAdamW(FusedUpdates, keras.optimizers.AdamW):
    def _shared_scalars(self) -> dict:
        step = tf.cast(self.iterations + 1, tf.float32)
        beta_1, beta_2 = tf.constant(self.beta_1, tf.float32), tf.constant(self.beta_2, tf.float32)
        return {"beta1_power": tf.pow(beta_1, step), "beta2_power": tf.pow(beta_2, step),
                "beta1": beta_1, "beta2": beta_2, "epsilon": tf.constant(self.epsilon, tf.float32)}

    def _fused_update(self, gradient, variable, lr) -> bool:
        if self.amsgrad:
            return False
        i = self._get_variable_index(variable)
        # var -= lr sqrt(1 - b2^t) / (1 - b1^t) x m / (sqrt(v) + eps): Keras' Adam, same order,
        # except that 1 - beta is formed in float32 (1 - 0.999f = 0.00099998713, not 0.001).
        tf.raw_ops.ResourceApplyAdam(
            var=variable.handle, m=_handle(self._momentums[i]), v=_handle(self._velocities[i]),
            lr=lr, grad=gradient, **self._step_scalars)
        return True


class FusedSGD(FusedUpdates, keras.optimizers.SGD):
    def _shared_scalars(self) -> dict:
        return {"momentum": tf.constant(self.momentum, tf.float32)}

    def _fused_update(self, gradient, variable, lr) -> bool:
        if not self.momentum:
            tf.raw_ops.ResourceApplyGradientDescent(var=variable.handle, alpha=lr, delta=gradient)
            return True
        # m = m x momentum - g x lr; var += m x momentum - g x lr (Nesterov) or m: Keras' SGD.
        m = self.momentums[self._get_variable_index(variable)]
        tf.raw_ops.ResourceApplyKerasMomentum(
            var=variable.handle, accum=_handle(m), lr=lr, grad=gradient,
            momentum=self._step_scalars["momentum"], use_nesterov=self.nesterov)
        return True


class FusedLamb(FusedUpdates, keras.optimizers.Lamb):
    """No fused kernel: Keras' update, the weight decay's schedule evaluated once."""


class FusedLion(FusedUpdates, keras.optimizers.Lion):
    """No fused kernel: Keras' update, the weight decay's schedule evaluated once."""
