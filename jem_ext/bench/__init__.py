"""``python -m jem_ext.bench``: one-call speed validation of jem_ext on a device.

Stages (each guarded: a failing stage records its error in the JSON and the others still run):

* ``env`` -- torch, jem_ext build facts, device name.
* ``ops`` -- effective bandwidth of ``sgld_step_`` (16M elements) and of the energy's
  forward + backward (2M x 10, 16800 x 1000 and 168 x 100,000 logits), as fractions of the
  device-to-device copy bandwidth measured on 64 MB (CUDA events over back-to-back calls).
* ``chain`` -- images x steps per second of the SGLD chain (WRN-28-10, batch 64, K=20) for each
  speed option (precision, channels-last, CUDA graph, compile), against an eager copy of the
  JEM reference sampler (per step ``autograd.grad`` of ``logsumexp``, then
  ``x.data += -step * g + std * randn_like(x)``, buffer on the CPU) on the same device.
* ``train`` -- seconds per full training iteration (chain + loss + update) for fp32 eager and
  the fastest option set, and the projected hours of the full CIFAR-10 recipe (150 epochs of
  50,000 images, batch 64).

Results go to ``<out>/bench.json`` and ``<out>/bench.md``. ``--smoke`` runs every stage on the
CPU with tiny sizes (a tiny WRN, K=2, few repeats) so the script is exercised by the test suite.

The scripts under ``benchmarks/`` take their helpers from here: :class:`ReferenceSampler` and
:func:`time_call` (``bench_sampler.py``), :func:`sync` (``bench_ddp.py``), :func:`cpu_name`
(``bench_ops.py``, ``bench_ddp.py``), :func:`time_interleaved` (``bench_ops.py``,
``bench_energy_ab.py``, ``bench_energy_autograd.py``), and :mod:`.studies`
(``digits_study.py`` and ``cifar_budget.py``: scoring through ``python -m jem_ext.eval``, the
energies of a run).
"""

from .chain import ReferenceSampler, stage_chain
from .cli import build_parser, main, run_bench
from .config import CPU_OPTIONS, GPU_OPTIONS, RECIPE, SMOKE, STAGES, Option, Sizes
from .ops import stage_env, stage_ops
from .report import markdown, write_results
from .studies import evaluate, last_energies, mean_confidence, read_report
from .timing import cpu_name, sync, time_call, time_interleaved
from .train import stage_train

__all__ = [
    "CPU_OPTIONS",
    "GPU_OPTIONS",
    "RECIPE",
    "SMOKE",
    "STAGES",
    "Option",
    "ReferenceSampler",
    "Sizes",
    "build_parser",
    "cpu_name",
    "evaluate",
    "last_energies",
    "main",
    "markdown",
    "mean_confidence",
    "read_report",
    "run_bench",
    "stage_chain",
    "stage_env",
    "stage_ops",
    "stage_train",
    "sync",
    "time_call",
    "time_interleaved",
    "write_results",
]
