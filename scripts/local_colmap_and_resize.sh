#!/bin/bash
# Poses the photos in DIR/images with the COLMAP command-line tools (tested against COLMAP 3.8) and writes
# DIR/sparse/0 plus the downsampled copies DIR/images_2, DIR/images_4 and DIR/images_8 used by the
# mip-NeRF 360 configs.
#
# Usage: bash scripts/local_colmap_and_resize.sh DIR [CAMERA_MODEL]
#   CAMERA_MODEL: OPENCV (default) for ordinary lenses, OPENCV_FISHEYE for fisheye lenses.
# Environment:
#   USE_GPU=0|1   SIFT extraction/matching on the GPU (default: 1 when nvidia-smi is found, else 0).
#   COLMAP=path   the colmap binary (default: colmap on PATH).
# Without the colmap binary, `python -m mipnerf360.colmap DIR --camera_model MODEL` does the same with
# pycolmap (CPU only).

set -euo pipefail

if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
  sed -n '2,13p' "$0"
  exit 1
fi

DATASET_PATH=$1
CAMERA=${2:-OPENCV}
COLMAP=${COLMAP:-colmap}
if [ -z "${USE_GPU:-}" ]; then
  if command -v nvidia-smi > /dev/null 2>&1; then USE_GPU=1; else USE_GPU=0; fi
fi

if [ ! -d "$DATASET_PATH/images" ]; then
  echo "Error: $DATASET_PATH/images does not exist; put your photos there first." >&2
  exit 1
fi
if ! command -v "$COLMAP" > /dev/null 2>&1; then
  echo "Error: '$COLMAP' not found. Install COLMAP (e.g. apt-get install colmap) or run" \
       "python -m mipnerf360.colmap $DATASET_PATH --camera_model $CAMERA" >&2
  exit 1
fi

echo "== Feature extraction (camera model $CAMERA, GPU $USE_GPU)"
"$COLMAP" feature_extractor \
  --database_path "$DATASET_PATH/database.db" \
  --image_path "$DATASET_PATH/images" \
  --ImageReader.single_camera 1 \
  --ImageReader.camera_model "$CAMERA" \
  --SiftExtraction.use_gpu "$USE_GPU"

echo "== Exhaustive matching"
"$COLMAP" exhaustive_matcher \
  --database_path "$DATASET_PATH/database.db" \
  --SiftMatching.use_gpu "$USE_GPU"
# For more than ~500 images, use the vocabulary tree matcher instead:
#   "$COLMAP" vocab_tree_matcher --database_path "$DATASET_PATH/database.db" \
#     --VocabTreeMatching.vocab_tree_path /path/to/vocab_tree.bin --SiftMatching.use_gpu "$USE_GPU"

echo "== Incremental mapping"
mkdir -p "$DATASET_PATH/sparse"
# A tighter global bundle adjustment tolerance than the default makes each adjustment finish sooner.
"$COLMAP" mapper \
  --database_path "$DATASET_PATH/database.db" \
  --image_path "$DATASET_PATH/images" \
  --output_path "$DATASET_PATH/sparse" \
  --Mapper.ba_global_function_tolerance=0.000001

if [ ! -d "$DATASET_PATH/sparse/0" ]; then
  echo "Error: COLMAP did not reconstruct $DATASET_PATH (no sparse/0); try more overlapping photos." >&2
  exit 1
fi

# Optional: undistort to ideal pinhole images (then train on DIR/dense):
#   "$COLMAP" image_undistorter --image_path "$DATASET_PATH/images" --input_path "$DATASET_PATH/sparse/0" \
#     --output_path "$DATASET_PATH/dense" --output_type COLMAP

echo "== Resizing to images_2, images_4, images_8"
resize_dir() {  # $1: factor, $2: percentage
  local dst="$DATASET_PATH/images_$1"
  rm -rf "$dst"
  cp -r "$DATASET_PATH/images" "$dst"
  if command -v mogrify > /dev/null 2>&1; then
    (cd "$dst" && ls | xargs -P 8 -I {} mogrify -resize "$2" {})
  else
    rm -rf "$dst"
    local py=${PYTHON:-python}
    "$py" -c "import sys; from mipnerf360 import colmap; colmap.resize_images(sys.argv[1], [int(sys.argv[2])])" \
      "$DATASET_PATH" "$1"
  fi
}
resize_dir 2 50%
resize_dir 4 25%
resize_dir 8 12.5%
echo "Done: $DATASET_PATH/sparse/0 and images_2/4/8"
