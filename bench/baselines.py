"""Dense baselines: accuracy and training time of the documented defaults, threads pinned.

Run on a quiet machine (`make bench`); another process on the same cores slows torch's threads badly.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import record  # noqa: E402

from sparsesearch import data  # noqa: E402
from sparsesearch.runtime import set_threads  # noqa: E402
from sparsesearch.train import TrainConfig, train_dense  # noqa: E402

CASES = [("digits-cnn", "digits", 97.0), ("lenet5", "fashion-mnist", 89.0)]


def main() -> None:
    threads = set_threads(2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model, dataset, target in CASES:
            config = TrainConfig(epochs=data.info(dataset).epochs)
            result = train_dense(model, dataset, config, torch.device("cpu"), Path(tmp) / f"{model}.pt")
            rows.append({"model": model, "dataset": dataset, "epochs": config.epochs, "threads": threads,
                         "test_acc_%": round(result.test_acc, 2), "target_%": target,
                         "met": result.test_acc >= target, "train_s": round(result.history.seconds, 1)})
            print(rows[-1])
    print(record("baselines", rows, "Dense baselines with default settings (SGD, cosine LR, seed 0), CPU."))


if __name__ == "__main__":
    main()
