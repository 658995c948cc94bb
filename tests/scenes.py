"""Test helpers shared by the dataset tests: a split of a generated scene as a RaySampler (its Scene is
`.scene`), and a Config for it."""

from mipnerf360 import configs, datasets

N_VIEWS = 12  # Views of the `colmap_scene` fixture (conftest.py).


def config(data_dir, **kw):
    kw.setdefault('batch_size', 512)
    return configs.Config(data_dir=data_dir, **kw)


def load(split, data_dir, config, rank=0, world_size=1):  # pylint: disable=redefined-outer-name
    return datasets.RaySampler(datasets.load_scene(config, split, data_dir), config, rank=rank,
                               world_size=world_size)
