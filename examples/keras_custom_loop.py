"""Your own Keras training loop (a ``tf.GradientTape`` step compiled with ``tf.function``), its
clipping tuned by cliptune.

The task is the adding problem on an LSTM with plain SGD at a learning rate of 1.0, where the
unclipped LSTM blows up within a few steps (see ``examples/keras_lstm.py``). The clip runs inside the
compiled step (``trial.clip``), with the same semantics as on torch; the step's loss, pre-clip norm
and clip flag go to ``trial.step`` with one host copy; each epoch reports the validation loss. The
lines cliptune adds are marked ``# cliptune``. Needs TensorFlow. Run it:

    python examples/keras_custom_loop.py
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow loads: no start-up lines
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # (both are needed for a silent import)

import keras
import tensorflow as tf

import cliptune

try:
    from examples.keras_lstm import make_data
except ModuleNotFoundError:  # run as a script from the examples folder
    from keras_lstm import make_data  # type: ignore[no-redef]

SEQ_LEN, EPOCHS, BATCH, LR = 30, 4, 32, 1.0


def train(trial: cliptune.Trial) -> None:
    """One trial: a Keras model, a compiled tape step with the trial's clip, an epoch metric."""
    keras.utils.set_random_seed(trial.seed or 0)
    X, y = make_data()
    train_ds = tf.data.Dataset.from_tensor_slices((X[:640], y[:640])).shuffle(
        640, seed=trial.seed).batch(BATCH)
    model = keras.Sequential([keras.Input((SEQ_LEN, 2)), keras.layers.LSTM(32),
                              keras.layers.Dense(1)])
    optimizer = keras.optimizers.SGD(learning_rate=trial.extras.get("lr", LR))
    variables = model.trainable_variables

    @tf.function
    def step(x: tf.Tensor, target: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x, training=True) - target))
        grads, norm, clipped = trial.clip(tape.gradient(loss, variables), variables)  # cliptune
        optimizer.apply_gradients(zip(grads, variables, strict=True))
        return tf.stack([loss, norm, tf.cast(clipped, tf.float32)])

    for epoch in range(EPOCHS):
        for x, target in train_ds:
            loss, norm, clipped = step(x, target).numpy().tolist()
            trial.step(loss, norm, clipped > 0.5)  # cliptune: the step, for the stability rules
        val_loss = float(tf.reduce_mean(tf.square(model(X[640:], training=False) - y[640:])))
        trial.report(epoch, val_loss=val_loss)  # cliptune: the epoch's metric


if __name__ == "__main__":
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    result = cliptune.tune_loop(train, search_space="rnn", n_trials=10, seed=0,  # cliptune
                                experiment="keras-custom-loop")
    print(result.summary())
