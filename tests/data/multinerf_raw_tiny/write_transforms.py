"""`python write_transforms.py SCENE`: writes SCENE/transforms.json from SCENE/poses_bounds.npy.

multinerf's LLFF loader (commit 5b4d4f6) reads cameras only from sparse/0 or transforms.json, not from LLFF's
poses_bounds.npy as ours also does; this gives it the same cameras (checked: our loader reads identical poses and
intrinsics from both files). Used to make this folder; see ../README_multinerf_checkpoint.md."""
import json
import os
import sys

import numpy as np

from mipnerf360.datasets import llff

scene = sys.argv[1]
names, poses, pixtocams, _, _, sizes = llff._load_poses_bounds_posedata(scene)  # pylint: disable=protected-access
intrinsics = np.linalg.inv(pixtocams[0])
frames = [{'file_path': f'images/{name}', 'transform_matrix': np.concatenate([pose, [[0, 0, 0, 1]]]).tolist()}
          for name, pose in zip(names, poses)]
doc = {'w': int(sizes[0][0]), 'h': int(sizes[0][1]), 'fl_x': intrinsics[0, 0], 'fl_y': intrinsics[1, 1],
       'cx': intrinsics[0, 2], 'cy': intrinsics[1, 2], 'frames': frames}
with open(os.path.join(scene, 'transforms.json'), 'w') as fp:
    json.dump(doc, fp, indent=1)
names_t, poses_t, pixtocams_t = llff.load_llff_posedata(scene)[:3]
assert names_t == names and np.array_equal(poses_t, poses) and np.array_equal(pixtocams_t, pixtocams)
