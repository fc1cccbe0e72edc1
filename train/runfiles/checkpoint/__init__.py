"""Checkpoints, the one home of their format: what `predict` needs plus what an exact `--resume`
needs, loadable with `torch.load(weights_only=True)` only.

Shards and checkpoints travel between people, so a checkpoint is never unpickled: every value is
a tensor or a plain type (dict, list, tuple, str, int, float, bool, None). That is why the RNG
states are converted (numpy's and Python's generators hold tuples of big integers and strings;
they become int64 tensors and plain numbers) and why the configuration is stored as its JSON dict.

    format.py   the keys (`FORMAT`), `RunState`, `CheckpointError`; the model a checkpoint describes
                (`ModelDescription`, `describe`) and builds (`build_model_of`, `meta_model`)
    checks.py   what is checked before anything is built, and `LIMITS`
    files.py    `save` (atomic, plain values only) and `load`: the one `torch.load`
    resume.py   a run in its checkpoint: `payload` (what the Trainer saves), `check_resumable`
                and `restore` (what `--resume` checks and reads back), `TrainState`, RNG states

Files are written to a temporary name in the same folder and moved into place with
`os.replace`, so a crash leaves either the old or the new checkpoint, never half of one.

Checkpoints come from other people, so `load` trusts nothing in one before it is checked, in
this order, and refuses in one line:

1. the file (`check_file`): a regular file, a zip archive (what `torch.save` writes; anything
   else is named: a pickle, a gzip file, text ...), its members stored uncompressed (torch never
   compresses, and a compressed member is how a small file would expand to gigabytes) and their
   declared sizes within the file's own size and `BRATS_SHARDS_MAX_CHECKPOINT_MB`;
2. `torch.load(weights_only=True)`, then the format, the keys and the run's plain fields
   (`check_fields`);
3. every value something is built from (`check_description`, also run on an exported model's
   config): channels, target, context, the preprocessing size (`BRATS_SHARDS_MAX_SIZE`, the
   readers' limit) and norm, the model's name, input and output channels, base width, depth and
   stem, each within `LIMITS`;
4. the weights (`check_weights`): the model is built on torch's `meta` device (no memory) and
   every tensor of `model_state` must have the key and shape of its parameter, so building the
   real model costs what the file holds, no more.

`--resume` adds `check_resumable`: the optimiser state (one entry per parameter, of its shape),
the scheduler and scaler states, every RNG state (sizes and ranges the generators accept), the
run counters and history, and the saved configuration's sizes (`size_problem`).
"""

from .checks import (LIMITS, MAX_IN_CHANNELS, SIZED, ZIP_MAGIC, check_description, check_fields, check_file,
                     check_weights, limit, size_problem, what_is)
from .files import check_plain, load, save
from .format import (BEST, FORMAT, LAST, OUT_CHANNELS, REQUIRED, CheckpointError, ModelDescription, RunState,
                     build_model_of, describe, meta_model, model_spec)
from .resume import TrainState, check_resumable, check_rng, payload, restore, rng_state, set_rng_state

__all__ = [
    "BEST", "FORMAT", "LAST", "LIMITS", "MAX_IN_CHANNELS", "OUT_CHANNELS", "REQUIRED", "SIZED", "ZIP_MAGIC",
    "CheckpointError", "ModelDescription", "RunState", "TrainState",
    "build_model_of", "check_description", "check_fields", "check_file", "check_plain", "check_resumable",
    "check_rng", "check_weights", "describe", "limit", "load", "meta_model", "model_spec", "payload", "restore",
    "rng_state", "save", "set_rng_state", "size_problem", "what_is",
]
