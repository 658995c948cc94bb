"""Writes the tree of a multinerf checkpoint file (every leaf's path, shape and dtype, in file order; no values)
as JSON: `python param_tree.py CHECKPOINT_FILE OUT.json`. Needs only msgpack (no JAX). Made
../multinerf_360_glo_tree.json from a configs/360.gin + GLO run; see ../README_multinerf_checkpoint.md."""
import json
import sys

import msgpack

_EXT_NDARRAY = 1  # flax's msgpack extension code for an array: msgpack of (shape, dtype name, bytes).


def _ext_hook(code, data):
    if code != _EXT_NDARRAY:
        raise ValueError(f'unexpected msgpack extension type {code}')
    shape, dtype, _ = msgpack.unpackb(data, raw=False)
    return {'__leaf__': [list(shape), dtype]}


def leaves(node, prefix=''):
    if '__leaf__' in node:
        yield [prefix[:-1]] + node['__leaf__']
        return
    for key, value in node.items():
        yield from leaves(value, f'{prefix}{key}/')


def main(source, out):
    with open(source, 'rb') as f:
        tree = msgpack.unpackb(f.read(), ext_hook=_ext_hook, raw=False, strict_map_key=False)
    with open(out, 'w') as f:
        rows = ',\n'.join('  ' + json.dumps(leaf) for leaf in leaves(tree))  # One leaf a line.
        f.write('{"leaves": [\n' + rows + '\n]}\n')


if __name__ == '__main__':
    main(*sys.argv[1:])
