"""Problem sizes, speed option sets and stage names of the bench."""

from __future__ import annotations

from dataclasses import dataclass

from ..chain import DEFAULT_BUFFER_SIZE, DEFAULT_N_STEPS

RECIPE = {"epochs": 150, "images": 50_000, "batch": 64}  # the CIFAR-10 JEM recipe


@dataclass(frozen=True)
class Sizes:
    """Problem sizes of a bench run."""

    sgld_elements: int = 16 * 2**20  # 64 MB of float32: more than the L2 cache
    energy_rows: int = 2**21  # x 10 classes: 80 MB of logits
    energy_classes: int = 10
    # (rows, classes) of the many-class energy figures: an ImageNet head and 100k classes,
    # 16M logits each
    energy_wide: tuple[tuple[int, int], ...] = ((16800, 1000), (168, 100_000))
    depth: int = 28
    width: int = 10
    image: tuple[int, int, int] = (3, 32, 32)
    batch: int = 64
    steps: int = DEFAULT_N_STEPS
    buffer: int = DEFAULT_BUFFER_SIZE
    reps: int = 5
    op_reps: int = 50
    # a model factory "PACKAGE.MODULE:FACTORY" (10 classes, ``image`` inputs) timed instead of
    # the WRN of ``depth`` and ``width``
    model: str | None = None


SMOKE = Sizes(
    sgld_elements=4096,
    energy_rows=256,
    energy_wide=((8, 1000), (2, 3000)),
    depth=10,
    width=1,
    image=(3, 8, 8),
    batch=4,
    steps=2,
    buffer=32,
    reps=2,
    op_reps=3,
)


@dataclass(frozen=True)
class Option:
    """One set of speed options for the chain and training stages."""

    name: str
    precision: str = "fp32"
    channels_last: bool = False
    cuda_graph: bool = False
    compile: bool = False


GPU_OPTIONS = (  # most telling first: a spent --budget-s skips from the end
    Option("fp32 eager"),
    Option("bf16", "bf16"),
    Option("bf16 + cuda-graph", "bf16", cuda_graph=True),
    Option("bf16 + channels-last", "bf16", channels_last=True),
    Option("bf16 + channels-last + cuda-graph", "bf16", channels_last=True, cuda_graph=True),
    Option("bf16 + cuda-graph + compile", "bf16", cuda_graph=True, compile=True),
)
CPU_OPTIONS = (
    Option("fp32 eager"),
    Option("bf16", "bf16"),
    Option("fp32 + channels-last", channels_last=True),
    Option("fp32 + compile", compile=True),
)


STAGES = ("env", "ops", "chain", "train")
