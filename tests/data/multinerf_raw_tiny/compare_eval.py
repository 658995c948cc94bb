"""`python compare_eval.py REFERENCE_DIR OUR_DIR`: compares multinerf's eval / render outputs with ours.

Every metric_*.txt the reference wrote (max |difference| over the images, and both means), and every PNG / TIFF
both wrote, per kind of output over its frames: max and mean |difference|, mean |reference| and the range of
ours - reference (PNGs in 8-bit units: [0, 1] where the floats agree, as ours round and the reference truncates).
Used for the by-hand comparisons in ../README_multinerf_checkpoint.md."""
import collections
import glob
import os
import sys

import numpy as np
from PIL import Image


def _names(folder, *patterns):
    return sorted({os.path.basename(f) for p in patterns for f in glob.glob(os.path.join(folder, p))})


def main(ref, ours):
    print('metrics: max |ref - ours| over the images; mean ref / ours')
    for name in _names(ref, 'metric_*.txt'):
        want = np.array(open(os.path.join(ref, name)).read().split(), float)
        if not os.path.exists(os.path.join(ours, name)):
            print(f'  {name:32s} missing in ours')
            continue
        got = np.array(open(os.path.join(ours, name)).read().split(), float)
        print(f'  {name:32s} max|d|={np.abs(want - got).max():.3g}  mean {want.mean():.6f} / {got.mean():.6f}')
    kinds = collections.defaultdict(list)
    for name in _names(ref, '*.png', '*.tiff'):
        kind = name.rsplit('_', 1)[0] + os.path.splitext(name)[1]
        if not os.path.exists(os.path.join(ours, name)):
            kinds[kind].append(None)
            continue
        want = np.asarray(Image.open(os.path.join(ref, name)), np.float64)
        got = np.asarray(Image.open(os.path.join(ours, name)), np.float64)
        d = got - want
        kinds[kind].append((np.abs(d).max(), np.abs(d).mean(), np.abs(want).mean(), d.min(), d.max()))
    print('images: per kind over frames, max |d|, mean |d|, mean |ref|, range of ours - ref')
    for kind, rows in kinds.items():
        if any(r is None for r in rows):
            print(f'  {kind:24s} missing in ours for {sum(r is None for r in rows)} frames')
            continue
        rows = np.array(rows)
        print(f'  {kind:24s} n={len(rows)} max={rows[:, 0].max():.4g} mean={rows[:, 1].mean():.4g} '
              f'(|ref| {rows[:, 2].mean():.4g}) ours-ref in [{rows[:, 3].min():.3g}, {rows[:, 4].max():.3g}]')
    only_ours = sorted(set(_names(ours, 'metric_*.txt', '*.png', '*.tiff')) - set(_names(ref, '*')))
    print(f'only in ours: {len(only_ours)} files', ', '.join(sorted({n.rsplit("_", 1)[0] for n in only_ours})))


if __name__ == '__main__':
    main(*sys.argv[1:3])
