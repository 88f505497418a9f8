"""Keras' BatchNormalization, computed in training by TensorFlow's fused kernel.

Why hand-written (#20): Keras 3 writes a training-mode batch norm as separate ops (the moments,
then the scale and shift) and its gradient as many more (broadcasts, reductions): about 30 ops
per layer in a training step (XXS at 64x64: 112 ms per step, 93 ms fused). TensorFlow's
`FusedBatchNormV3` (oneDNN on CPU, cuDNN on GPU) is one op forward and one backward. Everything
Keras owns stays: the variables, their names, the moving-average update (with the biased batch
variance, as Keras; the kernel's own batch variance is Bessel-corrected), the config, inference
(Keras' ops, which exports fold into the convolution anyway). Synchronized BN, masks, renorm and
any other layout or dtype take Keras' path.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import layers

from trainer.models import recompute

# cuDNN refuses an epsilon below 1e-5 (compared in double, which float32 1e-5 is not); TensorFlow's
# own fused_batch_norm wrapper raises it to this on every device. Ours keeps 1e-5 on the CPU.
CUDNN_MIN_EPSILON = 1.001e-5


@keras.saving.register_keras_serializable(package="mobilevit")
class FusedBatchNormalization(layers.BatchNormalization):
    def _fusable(self, inputs, mask) -> bool:
        return (keras.backend.backend() == "tensorflow" and mask is None
                and not self.synchronized and not self.renorm and len(inputs.shape) == 4
                and self.axis in (-1, 3) and inputs.dtype in (tf.float32, tf.float16))

    def call(self, inputs, training=None, mask=None):
        if not (training and self.trainable and self._fusable(inputs, mask)):
            if training and recompute.replaying():
                return self._keras_call_without_update(inputs, mask)
            return super().call(inputs, training=training, mask=mask)
        channels = inputs.shape[-1]
        gamma = self.gamma if self.scale else tf.ones([channels], tf.float32)
        beta = self.beta if self.center else tf.zeros([channels], tf.float32)
        epsilon = self.epsilon
        if tf.config.list_logical_devices("GPU"):
            epsilon = max(epsilon, CUDNN_MIN_EPSILON)
        outputs, mean, unbiased, *_ = tf.raw_ops.FusedBatchNormV3(
            x=inputs, scale=tf.cast(gamma, tf.float32), offset=tf.cast(beta, tf.float32),
            mean=tf.zeros([0], tf.float32), variance=tf.zeros([0], tf.float32),
            epsilon=epsilon, data_format="NHWC", is_training=True)
        count = tf.cast(tf.size(inputs) // channels, tf.float32)
        variance = unbiased * ((count - 1.0) / tf.maximum(count, 1.0))
        if recompute.replaying():  # the forward run of this block updated them already
            return tf.cast(outputs, self.compute_dtype)
        # Keras' update, in Keras' order of operations.
        self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(
            self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
        return tf.cast(outputs, self.compute_dtype)

    def _keras_call_without_update(self, inputs, mask):
        """Keras' training-mode call with the moving statistics left as they are: with momentum
        1, Keras' update writes back the value it read (set while this call is traced)."""
        momentum, self.momentum = self.momentum, 1.0
        try:
            return super().call(inputs, training=True, mask=mask)
        finally:
            self.momentum = momentum
