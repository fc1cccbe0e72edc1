"""The Python API end to end, in notebook cells (`# %%`: VS Code and Jupytext open them as cells).

    python examples/notebook_api.py            # seconds on a laptop CPU

Synthesises six tiny patients in a temporary folder, builds shards, trains v2 for one short epoch
on the CPU, evaluates (shard grid and native grid), predicts one patient from its folder and from
an array, and loads the model. Sizes are tiny so that it runs anywhere (tests/test_api_example.py
runs it); for real data, point `src` at your BraTS folder and drop the size options.
"""

# %% setup
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from etl import api as etl
from train import api

work = Path(tempfile.mkdtemp(prefix="brats-api-"))

# %% a synthetic BraTS 2020 release, then shards (workers=0: no Dask, in this process)
made = etl.synth(work / "src", patients=6, shape=(48, 48, 24))
built = etl.build_shards(work / "src", work / "shards", size=32, workers=0)
print(built.action, {name: split["records"] for name, split in built.content["splits"].items()}, built.digest[:12])

# %% train one short epoch of v2 on the CPU (every `train run` flag is a keyword argument)
result = api.train(work / "shards", work / "runs" / "v2", variant="v2", epochs=1, device="cpu", base=4, depth=2,
                   batch_size=8, workers=0, report=False)
print(result.reason)
print(f"{result.epochs} epoch(s), best mean Dice {result.best_score:.3f} at epoch {result.best_epoch}")

# %% evaluate: the object `train evaluate --json` writes
scores = api.evaluate(result.run_dir, work / "shards", src=work / "src", device="cpu", workers=0)
print(scores["headline"])

# %% predict: the checkpoint is loaded once, then any number of patients
predictor = api.Predictor(result.run_dir, device="cpu")
patient = sorted((work / "src" / "MICCAI_BraTS2020_TrainingData").glob("BraTS20_Training_*"))[0]
seg = predictor.predict(patient)  # uint8 (H, W, D) in the input's labels (0/1/2/4 here)
print(patient.name, seg.shape, seg.dtype, {int(v): int(n) for v, n in zip(*np.unique(seg, return_counts=True))})

# the same patient as an array (4, H, W, D): t1, t1ce, t2, flair, as stored
files = [patient / f"{patient.name}_{m}.nii" for m in ("t1", "t1ce", "t2", "flair")]
volume = np.stack([np.asarray(nib.load(f).dataobj, dtype=np.float32) for f in files])
same = predictor.predict(volume)
print("array input gives the same labels:", bool(np.array_equal(seg, same)))

# %% the trained network itself, for your own code
model = api.load_model(result.run_dir)  # torch.nn.Module, eval mode, on the CPU
print(type(model).__name__, sum(p.numel() for p in model.parameters()), "parameters")
