"""The Keras peer of `grandmother bench --peers`, run with the Python of scripts/keras_peer.sh's environment.

    runs/keras-venv/bin/python scripts/keras_peer.py < request.json   # what the bench does
    runs/keras-venv/bin/python scripts/keras_peer.py --check          # versions and one tiny layer

Request (stdin, JSON): {"batch": B, "repeats": R, "threads": T, "memory_bytes": N,
"implementations": [2, 1], "shapes": [{"stage", "C", "H", "W", "k", "M", "stride"}, ...]}.
Answer (stdout, one JSON object): {"tensorflow", "tf_keras", "threads", "rows": [{"stage", "implementation",
"seconds", "note"}]}; seconds is null where a row was not run, and note says why.

Each row is Keras 2's `LocallyConnected2D(M, k, strides=stride, implementation=I, use_bias=False)` on a
channels-last (B, H, W, C) float32 input: forward, then the gradients of the input and of the kernel for a
given dL/dy (tf.GradientTape inside one tf.function, Keras' fastest path: graph mode, as `fit` runs it).
After two untimed calls (tracing, first allocations), seconds = the mean of R timed calls.
Implementation 2 multiplies by a dense (H*W*C) x (Ho*Wo*M) masked kernel; implementation 1 slices every
output location's patch and does one batched product. Rows whose dense kernel (with its gradient and mask)
would not fit in memory_bytes, or implementation-1 rows with more than MAX_IMPL1_LOCATIONS locations (its
graph holds one slice per location), are not run.
This script imports TensorFlow and nothing of grandmother; grandmother never imports TensorFlow.
"""
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
MAX_IMPL1_LOCATIONS = 2500


def layer_step(tf, layer_cls, shape: dict, batch: int, implementation: int):
    """A tf.function doing forward + both gradients of one layer, or a string saying why not."""
    C, H, W, k, M, s = (shape[n] for n in ("C", "H", "W", "k", "M", "stride"))
    ho, wo = (H - k) // s + 1, (W - k) // s + 1
    g = tf.random.Generator.from_seed(0)
    x = tf.Variable(g.normal((batch, H, W, C)))
    gy = g.normal((batch, ho, wo, M))
    layer = layer_cls(M, k, strides=s, implementation=implementation, use_bias=False)
    layer.build(x.shape)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            y = layer(x)
        return tape.gradient(y, [x, layer.kernel], output_gradients=gy)
    return step


def refusal(shape: dict, implementation: int, memory_bytes: int):
    C, H, W, k, M, s = (shape[n] for n in ("C", "H", "W", "k", "M", "stride"))
    ho, wo = (H - k) // s + 1, (W - k) // s + 1
    if implementation == 2:
        need = 3 * 4 * H * W * C * ho * wo * M  # kernel, its gradient, the mask
        if need > memory_bytes:
            return f"dense kernel needs {need / 2**30:.1f} GiB, {memory_bytes / 2**30:.1f} GiB allowed"
    if implementation == 1 and ho * wo > MAX_IMPL1_LOCATIONS:
        return f"{ho * wo} locations (one graph slice each; limit {MAX_IMPL1_LOCATIONS})"
    return None


def main() -> int:
    import tensorflow as tf
    import tf_keras

    if sys.argv[1:] == ["--check"]:
        req = {"batch": 2, "repeats": 1, "threads": 1, "memory_bytes": 1 << 30, "implementations": [2, 1],
               "shapes": [{"stage": 0, "C": 2, "H": 7, "W": 7, "k": 3, "M": 2, "stride": 2}]}
    else:
        req = json.loads(sys.stdin.read())
    threads = int(req["threads"])
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    rows = []
    for shape in req["shapes"]:
        for impl in req["implementations"]:
            row = {"stage": shape["stage"], "implementation": impl, "seconds": None, "note": None}
            row["note"] = refusal(shape, impl, int(req["memory_bytes"]))
            if row["note"] is None:
                try:
                    step = layer_step(tf, tf_keras.layers.LocallyConnected2D, shape, int(req["batch"]), impl)
                    step()
                    step()
                    t = time.perf_counter()
                    for _ in range(int(req["repeats"])):
                        step()
                    row["seconds"] = (time.perf_counter() - t) / int(req["repeats"])
                except (tf.errors.OpError, ValueError, MemoryError) as e:  # one row fails, the others run
                    row["note"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            rows.append(row)
    print(json.dumps({"tensorflow": tf.__version__, "tf_keras": tf_keras.__version__, "threads": threads,
                      "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
