"""Runs multinerf's train.py or eval.py (`python run_multinerf.py train|eval FLAGS...`) from a multinerf checkout
($MULTINERF, default /tmp/multinerf), with flax.metrics.tensorboard replaced by a no-op writer (it needs
TensorFlow, which the metrics do not). Used to make this folder; see ../README_multinerf_checkpoint.md."""
import os
import sys
import types

ROOT = os.environ.get('MULTINERF', '/tmp/multinerf')
sys.path[:0] = [ROOT, os.path.join(ROOT, 'internal', 'pycolmap')]


class _NoOpWriter:
    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


stub = types.ModuleType('flax.metrics.tensorboard')
stub.SummaryWriter = _NoOpWriter
sys.modules['flax.metrics.tensorboard'] = stub

import flax.metrics  # noqa: E402
from absl import app  # noqa: E402

flax.metrics.tensorboard = stub
script = sys.argv.pop(1)
app.run(__import__(script).main)
