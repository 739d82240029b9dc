"""Training chars/s of the char-RNN in TensorFlow/Keras on the CPU: the same model
and step as `folio bench train` (Embedding -> GRU(reset_after) -> Dense, SGD,
masked-free cross-entropy over B x T next-character targets), one compiled
`tf.function` step, timed after a warm-up step. Prints one line per configuration:
`preset batch chars_per_second`.

Run by bench/keras-vs-folio.sh, which installs TensorFlow in its own venv.
"""

import argparse
import os
import time

PRESETS = {"seed": (256, 1024), "medium": (64, 512), "small": (32, 128)}
VOCAB = 86


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--presets", default="small,seed")
    parser.add_argument("--batch", default="8")
    parser.add_argument("--seq-len", type=int, default=100)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()

    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    for preset in args.presets.split(","):
        embed, hidden = PRESETS[preset]
        for batch in (int(b) for b in args.batch.split(",")):
            model = tf.keras.Sequential(
                [
                    tf.keras.layers.Input((args.seq_len,), batch_size=batch),
                    tf.keras.layers.Embedding(VOCAB, embed),
                    tf.keras.layers.GRU(hidden, return_sequences=True, reset_after=True),
                    tf.keras.layers.Dense(VOCAB),
                ]
            )
            optimizer = tf.keras.optimizers.SGD(0.5)
            loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)

            @tf.function
            def step(x, y):
                with tf.GradientTape() as tape:
                    loss = loss_fn(y, model(x, training=True))
                grads = tape.gradient(loss, model.trainable_variables)
                optimizer.apply_gradients(zip(grads, model.trainable_variables))
                return loss

            rng = tf.random.Generator.from_seed(0)
            data = [
                (
                    rng.uniform((batch, args.seq_len), 0, VOCAB, dtype=tf.int32),
                    rng.uniform((batch, args.seq_len), 0, VOCAB, dtype=tf.int32),
                )
                for _ in range(args.steps + 1)
            ]
            step(*data[0]).numpy()
            start = time.perf_counter()
            for x, y in data[1:]:
                step(x, y).numpy()
            elapsed = time.perf_counter() - start
            rate = args.steps * batch * args.seq_len / elapsed
            print(f"{preset} {batch} {rate:.0f}", flush=True)


if __name__ == "__main__":
    main()
