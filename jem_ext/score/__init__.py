"""``python -m jem_ext.score``: score images or arrays with a trained JEM.

One row per input: its path, the predicted class (and its name where the data set has names),
``max p(y|x)``, ``log p(x)`` (up to the model's constant) and an out-of-distribution flag,
``log p(x) < threshold``. The threshold is the ``--ood-quantile`` quantile of ``log p(x)`` over
the validation split of the run's own data set (default 0.05: 95% of validation images pass), or
``--threshold``. Rows go to ``--out`` as CSV (``.csv``) or JSON Lines (``.jsonl``); the threshold
and how it was chosen go beside it, to ``OUT.threshold.json``. Both files are written atomically
and only when at least one input was scored.

Inputs are read exactly as the training data are (:meth:`jem_ext.trained.Trained.read_image`,
the image-folder reader's decoder; :meth:`~jem_ext.trained.Trained.from_array` for ``.npy``).
An input that cannot be read or does not fit the model is skipped with one line on stderr
(``jem_ext.score: skipped PATH: ...``); bad flags are one line and exit status 2.

The parts, in the order a command runs them: :mod:`.cli` (flags, their checks, the entry
point), :mod:`.inputs` (the files named by ``--inputs``, read), :mod:`.threshold` (the OOD
threshold and its record) and :mod:`.scoring` (the rows, written).
"""

from .cli import build_parser, main
from .inputs import ScoreError, list_inputs, read_inputs
from .scoring import side_file
from .threshold import ood_threshold

__all__ = [
    "ScoreError",
    "build_parser",
    "list_inputs",
    "main",
    "ood_threshold",
    "read_inputs",
    "side_file",
]
