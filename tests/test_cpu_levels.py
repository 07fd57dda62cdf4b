"""The CPU kernels at every instruction-set level this machine supports
(forced with JEM_EXT_CPU_LEVEL in a subprocess) give the very bits of the
baseline level (the energy ops: the same bits up to 16 classes, within an
ulp-level tolerance beyond), and the noise they draw has the right
statistics."""

import math
import os
import platform
import shutil
import subprocess
import sys
import textwrap
from functools import cache

import numpy as np
import pytest
import torch
from scipy import stats

LEVELS = ["avx512", "avx2", "baseline"]  # best first
ENV = "JEM_EXT_CPU_LEVEL"

# Runs in a subprocess with the level forced: every case of sgld_step_ and
# _sgld_step_philox_, results saved to the file named by argv[1].
CASES_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    from jem_ext import ops

    DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
    # Tails of 8- and 16-lane vectors, of 1024-element noise blocks, and
    # sizes that span several blocks and threads.
    # 64- and 128-element chunks of the vector loops too.
    SIZES = [1, 3, 5, 7, 8, 9, 15, 17, 31, 33, 63, 65, 127, 129, 191, 257, 1023, 1025, 4099,
             40_003]
    BOUNDS = [dict(), dict(clamp_min=-0.5, clamp_max=0.75, grad_clip=0.3),
              dict(clamp_min=-1.0), dict(grad_clip=0.0)]

    def inputs(n, dtype, gen):
        x = (torch.rand(n, generator=gen, dtype=torch.float64) * 3 - 1.5).to(dtype)
        g = (torch.randn(n, generator=gen, dtype=torch.float64) * 2).to(dtype)
        if n > 10:  # a NaN and infinities must pass through the same way
            x[3], g[5], g[7] = float("nan"), float("inf"), float("-inf")
        return x, g

    def cases():
        gen = torch.Generator().manual_seed(0)
        for dtype in DTYPES:
            for n in SIZES:
                for i, bounds in enumerate(BOUNDS):
                    x, g = inputs(n, dtype, gen)
                    yield (f"philox {dtype} {n} {i}",
                           ops.sgld_step_philox_(x, g, 0.1, 0.7, 12345 + n, 8, **bounds))
                x, g = inputs(n, dtype, gen)
                rng = torch.Generator().manual_seed(n)
                yield (f"generator {dtype} {n}",
                       ops.sgld_step_(x, g, 0.05, 0.3, clamp_min=-1.0, clamp_max=1.0,
                                      generator=rng))
                x, g = inputs(n, dtype, gen)
                yield (f"no noise {dtype} {n}",
                       ops.sgld_step_philox_(x, g, 0.5, 0.0, 1, 0, clamp_max=0.5))
            # Non-contiguous x and grad: a transposed matrix, a strided slice.
            x = torch.randn(37, 41, generator=gen, dtype=torch.float64).to(dtype).t()
            g = torch.randn(41, 2 * 37, generator=gen, dtype=torch.float64).to(dtype)[:, ::2]
            yield (f"strided {dtype}", ops.sgld_step_philox_(x, g, 0.2, 0.5, 7, 4, grad_clip=1.0))
        # High words of the seed and of the counter in use.
        x = torch.zeros(5000)
        yield ("high words", ops.sgld_step_philox_(x, torch.zeros_like(x), 0.0, 1.0,
                                                   2**64 - 2**62 - 3, 4 * 2**33 + 4))
        # Seeds and offsets whose words fill every bit of Philox's first two
        # rounds (folded per block by the vector levels).
        for seed in [0, 1, 2**32 - 1, 2**32, 2**63 + 12345, 2**64 - 1]:
            for offset in [0, 4, 4 * (2**32 - 1), 4 * 2**32, 4 * (2**61 - 1)]:
                x = torch.zeros(300)
                yield (f"offsets {seed} {offset}",
                       ops.sgld_step_philox_(x, torch.zeros_like(x), 0.0, 1.0, seed, offset))
        # Word 2 of group 62 at seed 42007, offset 0 is 0xffffff86: u = 1, whose log is
        # +0, so the radius is sqrt(-0) = -0 and element 250's noise a zero whose sign
        # only a -2 log rounded as the scalar one keeps; x = -0 and step 0 let that
        # sign through to the result.
        x = torch.full((256,), -0.0)
        yield ("radius -0", ops.sgld_step_philox_(x, torch.zeros_like(x), 0.0, 1.0, 42007, 0))
        # The noise alone, for its statistics.
        x = torch.zeros(1_000_000)
        yield ("noise", ops.sgld_step_philox_(x, torch.zeros_like(x), 0.0, 1.0, 2024, 0))

    torch.save(dict(level=torch.ops.jem_ext._cpu_level(), cases=dict(cases())), sys.argv[1])
""")


# The same for the energy ops in float32 (the type with per-level loops):
# class counts with a compile-time loop (2..16) and without (1, 17, 100),
# batch sizes with tails of vectors and of row blocks, non-finite rows.
ENERGY_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    import jem_ext  # loads the op library

    ops = torch.ops.jem_ext
    CLASSES = [1, 2, 3, 7, 10, 15, 16, 17, 100]
    BATCHES = [1, 5, 17, 205, 1000, 4099]

    def logits(b, c, gen):
        l = torch.randn(b, c, generator=gen) * 4
        if b > 4 and c > 1:
            l[1, 0] = float("nan")
            l[2, :] = float("-inf")
            l[3, c - 1] = float("inf")
            l[4, :] = 1e30
        if b > 5 and c > 1:
            l[5, 0] = -200.0  # exp underflows: below the max by more than 87.3
        if b > 20 and c > 1:  # a row of its own group of 8 or 16: the in-range exps
            l[20, :] = 0.0
            l[20, 0] = -87.3365  # a subnormal exp
            l[20, 1] = -0.0
        return l

    def cases():
        gen = torch.Generator().manual_seed(0)
        for c in CLASSES:
            for b in BATCHES:
                l = logits(b, c, gen)
                y = torch.randint(0, c, (b,), generator=gen)
                g = torch.randn(b, generator=gen)
                gp = torch.randn(b, generator=gen)
                e = ops.energy(l)
                yield f"energy {b}x{c}", e
                yield f"energy y {b}x{c}", ops.energy(l, y)
                yield f"energy_ce {b}x{c}", torch.stack(ops.energy_ce(l, y))
                yield f"backward hint {b}x{c}", ops.energy_backward(l, None, e, g, None)
                yield f"backward {b}x{c}", ops.energy_backward(l, y, None, g, gp)
                yield f"backward pick {b}x{c}", ops.energy_backward(l, y, None, None, gp)
                e_kept, probs = ops._energy_softmax(l)
                yield f"energy kept softmax {b}x{c}", torch.stack([e_kept, e])
                yield f"softmax {b}x{c}", probs.clone()
                ops._energy_softmax_backward_(probs, g)
                yield f"softmax backward {b}x{c}", probs

    torch.save(dict(level=ops._cpu_level(), cases=dict(cases())), sys.argv[1])
""")


def run_python(code: str, level: str | None, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != ENV}
    if level is not None:
        env[ENV] = level
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True
    )


@cache
def best_level() -> str:
    out = run_python("import torch, jem_ext; print(torch.ops.jem_ext._cpu_level())", None)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def supported_levels() -> list[str]:
    return LEVELS[LEVELS.index(best_level()) :]


@cache
def level_results(level: str, tmp_dir: str, script: str = CASES_SCRIPT) -> dict:
    name = "sgld" if script == CASES_SCRIPT else "energy"
    path = os.path.join(tmp_dir, f"{name}-{level}.pt")
    out = run_python(script, level, path)
    assert out.returncode == 0, out.stderr
    return torch.load(path)


@pytest.fixture(scope="module")
def tmp_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cpu_levels"))


def bits(t: torch.Tensor) -> np.ndarray:
    """The raw bits of a tensor (NaN payloads included), in logical order."""
    as_int = {8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()]
    return t.contiguous().view(as_int).numpy()


@pytest.mark.parametrize("level", LEVELS)
def test_level_bit_identical_to_baseline(level, tmp_dir):
    if level not in supported_levels():
        pytest.skip(f"this CPU lacks {level}")
    got = level_results(level, tmp_dir)
    want = level_results("baseline", tmp_dir)
    assert got["level"] == level
    assert got["cases"].keys() == want["cases"].keys()
    for name, t in got["cases"].items():
        np.testing.assert_array_equal(bits(t), bits(want["cases"][name]), err_msg=name)


# Up to 16 classes every row runs the same operations in the same order at
# every level: the same bits. Beyond, the row max and sum are vector
# reductions whose lane count (and so summation order) follows the level:
# the max is exact either way, but the sum of C exponentials (each in
# [0, 1], the sum in [1, C]) may round differently by an ulp or two of the
# sum. That moves log(sum), so lse and the cross-entropy, by a few ulp of 1
# (absolute), and the gradient, scaled by 1 / sum, by a few ulp of itself.
STATIC_CLASSES = range(1, 17)
FEW_ULP = 4 * torch.finfo(torch.float32).eps


def classes_of(name: str) -> int:
    return int(name.rsplit("x", 1)[1])


@pytest.mark.parametrize("level", LEVELS)
def test_energy_level_matches_baseline(level, tmp_dir):
    if level not in supported_levels():
        pytest.skip(f"this CPU lacks {level}")
    got = level_results(level, tmp_dir, ENERGY_SCRIPT)
    want = level_results("baseline", tmp_dir, ENERGY_SCRIPT)
    assert got["level"] == level
    assert got["cases"].keys() == want["cases"].keys()
    for name, t in got["cases"].items():
        ref = want["cases"][name]
        if classes_of(name) in STATIC_CLASSES:
            np.testing.assert_array_equal(bits(t), bits(ref), err_msg=name)
        else:
            torch.testing.assert_close(t, ref, rtol=FEW_ULP, atol=FEW_ULP, equal_nan=True, msg=name)


@pytest.mark.parametrize("level", LEVELS)
def test_level_noise_statistics(level, tmp_dir):
    if level not in supported_levels():
        pytest.skip(f"this CPU lacks {level}")
    z = level_results(level, tmp_dir)["cases"]["noise"].double().numpy()
    se = 1 / math.sqrt(z.size)
    assert abs(z.mean()) < 5 * se
    assert abs(z.var() - 1) < 5 * math.sqrt(2) * se
    assert abs(stats.skew(z)) < 5 * math.sqrt(6) * se
    assert abs(stats.kurtosis(z)) < 5 * math.sqrt(24) * se
    assert stats.kstest(z, "norm").pvalue > 1e-4
    for lag in (1, 2, 3, 4, 8, 16):
        assert abs(np.corrcoef(z[:-lag], z[lag:])[0, 1]) < 5 * se


def cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(
    not os.path.exists("/proc/cpuinfo") or platform.machine() != "x86_64",
    reason="reads the x86 CPU flags from /proc/cpuinfo",
)
def test_default_level_is_the_best_the_cpu_supports():
    flags = cpu_flags()
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx2", "fma"} <= flags:
        want = "avx512"
    elif {"avx2", "fma"} <= flags:
        want = "avx2"
    else:
        want = "baseline"
    assert best_level() == want


LEVEL_CALL = (
    "import torch, jem_ext; x = torch.zeros(9); "
    "jem_ext.ops.sgld_step_(x, torch.zeros(9), 0.1, 1.0); "
    "print(torch.ops.jem_ext._cpu_level())"
)


def test_unknown_level_is_a_clear_error():
    out = run_python(LEVEL_CALL, "sse9")
    assert out.returncode != 0
    assert "JEM_EXT_CPU_LEVEL=sse9: unknown CPU level" in out.stderr


def test_unsupported_level_is_a_clear_error():
    missing = LEVELS[: LEVELS.index(best_level())]
    if not missing:
        pytest.skip("this CPU supports every level")
    out = run_python(LEVEL_CALL, missing[-1])
    assert out.returncode != 0
    assert "lacks that instruction set" in out.stderr


# The vector levels take the angle's quarter turn from the word's bits and
# the log's exponent from 2u (sgld_cpu.cpp says why the bits agree): a C++
# check compiled against the kernel source compares them with the scalar
# definition for every 24-bit uniform the words can give.
EXHAUSTIVE_SRC = os.path.join(os.path.dirname(__file__), "box_muller_exhaustive.cpp")
CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the vector levels are x86")
@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_vector_box_muller_every_word(tmp_path):
    from torch.utils.cpp_extension import include_paths, library_paths

    exe = tmp_path / "box_muller_exhaustive"
    std = "c++20" if torch.__version__ >= "2.14" else "c++17"  # as CMakeLists.txt
    compile_cmd = ["g++", "-O2", f"-std={std}", "-w", f"-I{CSRC}"]
    compile_cmd += [f"-I{p}" for p in include_paths()]
    compile_cmd += [EXHAUSTIVE_SRC, "-o", str(exe)]
    for lib in library_paths():
        compile_cmd += [f"-L{lib}", f"-Wl,-rpath,{lib}"]
    compile_cmd += ["-ltorch_cpu", "-lc10"]
    built = subprocess.run(compile_cmd, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-4000:]
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    checked = [line for line in out.stdout.splitlines() if " differ" in line]
    assert len(checked) == len([lv for lv in supported_levels() if lv != "baseline"]), out.stdout
