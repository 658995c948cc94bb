#!/bin/bash
# Poses the photos in DIR/images with the COLMAP command-line tools (tested with Debian's COLMAP 3.8) and writes
# DIR/sparse/0 (the largest model) plus the downsampled copies DIR/images_2, DIR/images_4 and DIR/images_8
# used by the mip-NeRF 360 configs (each side rounded half up, as in the official dataset).
#
# Usage: bash scripts/local_colmap_and_resize.sh DIR [CAMERA_MODEL]
#   CAMERA_MODEL: OPENCV (default) for ordinary lenses, OPENCV_FISHEYE for fisheye lenses, or SIMPLE_PINHOLE,
#                 PINHOLE, SIMPLE_RADIAL, RADIAL. All photos share one camera.
# Environment:
#   MATCHER=exhaustive|sequential|vocab_tree  how image pairs are matched: exhaustive (default) up to a few
#                 hundred photos; sequential for video frames; vocab_tree for large captures (~500+ photos).
#   VOCAB_TREE=path  a COLMAP vocabulary tree (e.g. vocab_tree_flickr100K_words32K.bin from colmap.github.io);
#                 implies MATCHER=vocab_tree unless MATCHER is set.
#   HARD=1        when too few photos register: a mapper that starts from, and registers with, fewer inliers.
#   HARD=2        also more, weaker DSP-SIFT features and guided matching (small, blurry or low-texture photos;
#                 several times slower on a CPU). The values are HARD_SETTINGS in mipnerf360/colmap.py.
#   USE_GPU=0|1   SIFT on the GPU (default 1 when nvidia-smi is found and colmap is a CUDA build, else 0).
#   NUM_THREADS=n threads for every step (default -1: all cores; 1 makes the mapping reproducible).
#   COLMAP=path   the colmap binary (default: colmap on PATH).  PYTHON=path  python for the PIL resize.
# Without the colmap binary, `python -m mipnerf360.colmap DIR --camera_model MODEL` does the same with
# pycolmap (CPU only), and retries with the hard-capture settings when fewer than 90% of the photos register.

set -euo pipefail

if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
  sed -n '2,22p' "$0"
  exit 1
fi

DATASET_PATH=$1
CAMERA=${2:-OPENCV}
COLMAP=${COLMAP:-colmap}
NUM_THREADS=${NUM_THREADS:--1}
HARD=${HARD:-0}
export QT_QPA_PLATFORM=${QT_QPA_PLATFORM:-offscreen}  # COLMAP links Qt; no display is needed.
if [ -n "${VOCAB_TREE:-}" ]; then MATCHER=${MATCHER:-vocab_tree}; fi
MATCHER=${MATCHER:-exhaustive}

if [ ! -d "$DATASET_PATH/images" ]; then
  echo "Error: $DATASET_PATH/images does not exist; put your photos there first." >&2
  exit 1
fi
if ! command -v "$COLMAP" > /dev/null 2>&1; then
  echo "Error: '$COLMAP' not found. Install COLMAP (e.g. apt-get install colmap) or run" \
       "python -m mipnerf360.colmap $DATASET_PATH --camera_model $CAMERA" >&2
  exit 1
fi
case "$CAMERA" in
  SIMPLE_PINHOLE|PINHOLE|SIMPLE_RADIAL|RADIAL|OPENCV|OPENCV_FISHEYE) ;;
  *) echo "Error: camera model '$CAMERA' is not one the loader reads; use OPENCV, OPENCV_FISHEYE," \
          "SIMPLE_PINHOLE, PINHOLE, SIMPLE_RADIAL or RADIAL." >&2; exit 1 ;;
esac
case "$MATCHER" in
  exhaustive|sequential) ;;
  vocab_tree)
    if [ ! -f "${VOCAB_TREE:-}" ]; then
      echo "Error: MATCHER=vocab_tree needs VOCAB_TREE=path to a vocabulary tree file (got '${VOCAB_TREE:-}');" \
           "download one from https://demuc.de/colmap/ or use MATCHER=exhaustive." >&2
      exit 1
    fi ;;
  *) echo "Error: MATCHER='$MATCHER' is not one of exhaustive, sequential, vocab_tree." >&2; exit 1 ;;
esac
case "$HARD" in
  0|1|2) ;;
  *) echo "Error: HARD='$HARD' is not 0, 1 or 2." >&2; exit 1 ;;
esac
if [ -z "${USE_GPU:-}" ]; then
  # A COLMAP built without CUDA falls back to OpenGL SIFT for use_gpu=1, which needs a display.
  if command -v nvidia-smi > /dev/null 2>&1 && ! "$COLMAP" -h 2>&1 | grep -q "without CUDA"; then
    USE_GPU=1
  else
    USE_GPU=0
  fi
fi

# The same values as HARD_SETTINGS in mipnerf360/colmap.py.
EXTRACT_OPTS=()
MATCH_OPTS=()
MAPPER_OPTS=()
if [ "$HARD" -ge 1 ]; then
  MATCH_OPTS=(--SiftMatching.min_num_inliers 8)
  MAPPER_OPTS=(--Mapper.min_num_matches 8 --Mapper.init_min_num_inliers 30 --Mapper.init_min_tri_angle 4
               --Mapper.abs_pose_min_num_inliers 12 --Mapper.abs_pose_min_inlier_ratio 0.1)
fi
if [ "$HARD" -ge 2 ]; then
  EXTRACT_OPTS=(--SiftExtraction.peak_threshold 0.002 --SiftExtraction.domain_size_pooling 1
                --SiftExtraction.max_num_features 16384)
  MATCH_OPTS+=(--SiftMatching.guided_matching 1)
fi

DB="$DATASET_PATH/database.db"
rm -f "$DB"  # A stale database would keep old features and add new models next to the old ones.

echo "== Feature extraction (camera model $CAMERA, one shared camera, GPU $USE_GPU, HARD=$HARD)"
"$COLMAP" feature_extractor \
  --database_path "$DB" \
  --image_path "$DATASET_PATH/images" \
  --ImageReader.single_camera 1 \
  --ImageReader.camera_model "$CAMERA" \
  --SiftExtraction.use_gpu "$USE_GPU" \
  --SiftExtraction.num_threads "$NUM_THREADS" ${EXTRACT_OPTS[@]+"${EXTRACT_OPTS[@]}"}

echo "== ${MATCHER} matching"
MATCH_COMMON=(--database_path "$DB" --SiftMatching.use_gpu "$USE_GPU" --SiftMatching.num_threads "$NUM_THREADS"
              ${MATCH_OPTS[@]+"${MATCH_OPTS[@]}"})
case "$MATCHER" in
  exhaustive) "$COLMAP" exhaustive_matcher "${MATCH_COMMON[@]}" ;;
  sequential) "$COLMAP" sequential_matcher "${MATCH_COMMON[@]}" ;;
  vocab_tree) "$COLMAP" vocab_tree_matcher "${MATCH_COMMON[@]}" --VocabTreeMatching.vocab_tree_path "$VOCAB_TREE" ;;
esac

echo "== Incremental mapping"
MODELS="$DATASET_PATH/sparse_models"
rm -rf "$MODELS"
mkdir -p "$MODELS"
# A tighter global bundle adjustment tolerance than the default makes each adjustment finish sooner.
# A failed mapping is reported below, with what to do.
"$COLMAP" mapper \
  --database_path "$DB" \
  --image_path "$DATASET_PATH/images" \
  --output_path "$MODELS" \
  --Mapper.num_threads "$NUM_THREADS" \
  --Mapper.ba_global_function_tolerance=0.000001 ${MAPPER_OPTS[@]+"${MAPPER_OPTS[@]}"} || true

# The mapper writes one folder per disconnected model (0, 1, ...); keep the one with the most images.
BEST=""
BEST_N=0
for m in "$MODELS"/*/; do
  [ -f "$m/images.bin" ] || [ -f "$m/images.txt" ] || continue
  n=$("$COLMAP" model_analyzer --path "$m" 2>&1 | sed -n 's/.*Registered images: *\([0-9]*\).*/\1/p' | head -1)
  if [ "${n:-0}" -gt "$BEST_N" ]; then BEST=$m; BEST_N=$n; fi
done
if [ -z "$BEST" ]; then
  rm -rf "$MODELS"
  echo "Error: COLMAP could not reconstruct $DATASET_PATH (no model). Run again with HARD=1, then HARD=2" \
       "(settings for hard captures), or take more overlapping, sharp photos of a textured scene." >&2
  exit 1
fi
rm -rf "$DATASET_PATH/sparse/0"
mkdir -p "$DATASET_PATH/sparse"
mv "$BEST" "$DATASET_PATH/sparse/0"
rm -rf "$MODELS"
TOTAL=$(find "$DATASET_PATH/images" -maxdepth 1 -type f | wc -l)
echo "Registered $BEST_N / $TOTAL images; model written to $DATASET_PATH/sparse/0"
if [ $((BEST_N * 10)) -lt $((TOTAL * 9)) ] && [ "$HARD" -lt 2 ]; then
  echo "Warning: fewer than 90% of the photos registered; run again with HARD=$((HARD + 1))" \
       "(settings for hard captures)."
fi

# Optional: undistort to ideal pinhole images (then train on DIR/dense):
#   "$COLMAP" image_undistorter --image_path "$DATASET_PATH/images" --input_path "$DATASET_PATH/sparse/0" \
#     --output_path "$DATASET_PATH/dense" --output_type COLMAP

echo "== Resizing to images_2, images_4, images_8"
resize_dir() {  # $1: factor, $2: percentage. Both routes round each side half up: floor(size / factor + 0.5).
  local dst="$DATASET_PATH/images_$1"
  rm -rf "$dst"
  if command -v mogrify > /dev/null 2>&1; then
    cp -r "$DATASET_PATH/images" "$dst"
    (cd "$dst" && ls | xargs -P 8 -I {} mogrify -resize "$2" {})
  else
    local py=${PYTHON:-python}
    "$py" -c "import sys; from mipnerf360 import colmap; colmap.resize_images(sys.argv[1], [int(sys.argv[2])])" \
      "$DATASET_PATH" "$1"
  fi
}
resize_dir 2 50%
resize_dir 4 25%
resize_dir 8 12.5%
echo "Done: $DATASET_PATH/sparse/0 and images_2/4/8"
