"""The face subsets the net-alone scripts score (imported by them; run from docs/results/):
256 held-out training faces (the last 256 of train_32.npz, which fit-cond never trains on
with --n-val 256), the first 256 standard and looser test faces, then all of each."""
import numpy as np


def scored_subsets(train: str, test: str, loose: str) -> dict[str, np.ndarray]:
    """Paths of train_32.npz, test_32.npz and the looser test set -> {name: uint8 (N, 32, 32, 3)}."""
    standard, looser = np.load(test)["images"], np.load(loose)["images"]
    return {"held-out": np.load(train)["images"][-256:], "standard 256": standard[:256],
            "looser 256": looser[:256], "standard all": standard, "looser all": looser}
