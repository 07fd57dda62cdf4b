"""Command lines of the tiny training runs the trainer's tests share."""

# A tiny JEM on the 2-D toy moons (32 iterations per epoch, a fraction of a second each).
TOY = [
    "--dataset", "moons", "--model", "mlp", "--width", "16", "--depth", "2",
    "--sgld-steps", "2", "--buffer-size", "100", "--warmup-iters", "5",
    "--no-progress", "--log-every", "1", "--sample-every", "0",
]  # fmt: skip
