"""On-device measurement: the timing harness, latency tables, the fitted latency model, validation.

- `timing.compare`: the one harness every latency goes through.
- `table`: `Profile` (rows keyed by layer signature + device fingerprint), `load_profile`, `find_profile`.
- `build`: `build_layer`, the one builder of the compact layers that are timed.
- `measure`: the grid a model's couplings produce, and `profile_model` (resumable).
- `predictor`: `LatencyModel().fit(profile)`, `predict_latency`, `dense_latency`.
- `validate`: random plans compacted and timed end to end against the prediction.
"""

from .predictor import LatencyModel, Prediction, dense_latency, latency_model_for, predict_latency
from .table import Profile, find_profile, fingerprint, load_profile

__all__ = ["LatencyModel", "Prediction", "Profile", "dense_latency", "find_profile", "fingerprint", "latency_model_for",
           "load_profile", "predict_latency"]
