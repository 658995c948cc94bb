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
#                 When fewer than 90% of the photos register, the script retries once by itself with the next
#                 HARD level (HARD unset: 0, then 1) and keeps the model with more photos.
#   NO_RETRY=1    no automatic retry (as does HARD=0 set explicitly).
#   USE_GPU=0|1   SIFT on the GPU (default 1 when nvidia-smi is found and colmap is a CUDA build, else 0).
#   NUM_THREADS=n threads for every step (default -1: all cores; 1 makes the mapping reproducible).
#   COLMAP=path   the colmap binary (default: colmap on PATH).  PYTHON=path  python for the PIL resize.
# Without the colmap binary, `python -m mipnerf360.colmap DIR --camera_model MODEL` does the same with
# pycolmap (CPU only), and retries with the hard-capture settings when fewer than 90% of the photos register.

set -euo pipefail

if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
  sed -n '2,25p' "$0"
  exit 1
fi

DATASET_PATH=$1
CAMERA=${2:-OPENCV}
COLMAP=${COLMAP:-colmap}
NUM_THREADS=${NUM_THREADS:--1}
if [ -n "${HARD+set}" ] && [ "$HARD" = 0 ]; then NO_RETRY=1; fi  # HARD=0 set explicitly: those settings only.
HARD=${HARD:-0}
NO_RETRY=${NO_RETRY:-0}
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
case "$NO_RETRY" in
  0|1) ;;
  *) echo "Error: NO_RETRY='$NO_RETRY' is not 0 or 1." >&2; exit 1 ;;
esac
if [ -z "${USE_GPU:-}" ]; then
  # A COLMAP built without CUDA falls back to OpenGL SIFT for use_gpu=1, which needs a display.
  if command -v nvidia-smi > /dev/null 2>&1 && ! "$COLMAP" -h 2>&1 | grep -q "without CUDA"; then
    USE_GPU=1
  else
    USE_GPU=0
  fi
fi

DB="$DATASET_PATH/database.db"
TOTAL=$(find "$DATASET_PATH/images" -maxdepth 1 -type f | wc -l)

# One SfM attempt with the settings of HARD level $1: features, matches and mapping from a fresh database; the
# largest model goes to $2 (absent if there is none) and its number of registered images to REGISTERED.
sfm_attempt() {
  local level=$1 out=$2
  # The same values as HARD_SETTINGS in mipnerf360/colmap.py.
  local extract_opts=() match_opts=() mapper_opts=()
  if [ "$level" -ge 1 ]; then
    match_opts=(--SiftMatching.min_num_inliers 8)
    mapper_opts=(--Mapper.min_num_matches 8 --Mapper.init_min_num_inliers 30 --Mapper.init_min_tri_angle 4
                 --Mapper.abs_pose_min_num_inliers 12 --Mapper.abs_pose_min_inlier_ratio 0.1)
  fi
  if [ "$level" -ge 2 ]; then
    extract_opts=(--SiftExtraction.peak_threshold 0.002 --SiftExtraction.domain_size_pooling 1
                  --SiftExtraction.max_num_features 16384)
    match_opts+=(--SiftMatching.guided_matching 1)
  fi
  rm -f "$DB"  # A stale database would keep old features and add new models next to the old ones.

  echo "== Feature extraction (camera model $CAMERA, one shared camera, GPU $USE_GPU, HARD=$level)"
  "$COLMAP" feature_extractor \
    --database_path "$DB" \
    --image_path "$DATASET_PATH/images" \
    --ImageReader.single_camera 1 \
    --ImageReader.camera_model "$CAMERA" \
    --SiftExtraction.use_gpu "$USE_GPU" \
    --SiftExtraction.num_threads "$NUM_THREADS" ${extract_opts[@]+"${extract_opts[@]}"}

  echo "== ${MATCHER} matching"
  local match_common=(--database_path "$DB" --SiftMatching.use_gpu "$USE_GPU"
                      --SiftMatching.num_threads "$NUM_THREADS" ${match_opts[@]+"${match_opts[@]}"})
  case "$MATCHER" in
    exhaustive) "$COLMAP" exhaustive_matcher "${match_common[@]}" ;;
    sequential) "$COLMAP" sequential_matcher "${match_common[@]}" ;;
    vocab_tree) "$COLMAP" vocab_tree_matcher "${match_common[@]}" --VocabTreeMatching.vocab_tree_path "$VOCAB_TREE" ;;
  esac

  echo "== Incremental mapping"
  local models="$DATASET_PATH/sparse_models"
  rm -rf "$models" "$out"
  mkdir -p "$models"
  # A tighter global bundle adjustment tolerance than the default makes each adjustment finish sooner.
  # A failed mapping is reported by the caller, with what to do.
  "$COLMAP" mapper \
    --database_path "$DB" \
    --image_path "$DATASET_PATH/images" \
    --output_path "$models" \
    --Mapper.num_threads "$NUM_THREADS" \
    --Mapper.ba_global_function_tolerance=0.000001 ${mapper_opts[@]+"${mapper_opts[@]}"} || true

  # The mapper writes one folder per disconnected model (0, 1, ...); keep the one with the most images.
  local best="" m n
  REGISTERED=0
  for m in "$models"/*/; do
    [ -f "$m/images.bin" ] || [ -f "$m/images.txt" ] || continue
    n=$("$COLMAP" model_analyzer --path "$m" 2>&1 | sed -n 's/.*Registered images: *\([0-9]*\).*/\1/p' | head -1)
    if [ "${n:-0}" -gt "$REGISTERED" ]; then best=$m; REGISTERED=$n; fi
  done
  if [ -n "$best" ]; then mv "$best" "$out"; fi
  rm -rf "$models"
}

too_few() { [ $(($1 * 10)) -lt $((TOTAL * 9)) ]; }

FIRST="$DATASET_PATH/sparse_hard$HARD"
sfm_attempt "$HARD" "$FIRST"
BEST=$FIRST
BEST_N=$REGISTERED
USED=$HARD
if too_few "$BEST_N" && [ "$NO_RETRY" = 0 ] && [ "$HARD" -lt 2 ]; then
  NEXT=$((HARD + 1))
  echo "Registered $BEST_N / $TOTAL images with HARD=$HARD (fewer than 90%); retrying once with HARD=$NEXT" \
       "(settings for hard captures; NO_RETRY=1 turns this off)."
  SECOND="$DATASET_PATH/sparse_hard$NEXT"
  sfm_attempt "$NEXT" "$SECOND"
  if [ "$REGISTERED" -gt "$BEST_N" ]; then
    echo "Keeping the HARD=$NEXT model: $REGISTERED images registered against $BEST_N with HARD=$HARD."
    rm -rf "$FIRST"
    BEST=$SECOND
    BEST_N=$REGISTERED
    USED=$NEXT
  else
    echo "Keeping the HARD=$HARD model: $BEST_N images registered against $REGISTERED with HARD=$NEXT."
    rm -rf "$SECOND"
  fi
fi
if [ "$BEST_N" = 0 ]; then
  rm -rf "$BEST"
  echo "Error: COLMAP could not reconstruct $DATASET_PATH (no model, last tried with HARD=$USED). Run again with" \
       "HARD=2 (settings for hard captures), or take more overlapping, sharp photos of a textured scene." >&2
  exit 1
fi
rm -rf "$DATASET_PATH/sparse/0"
mkdir -p "$DATASET_PATH/sparse"
mv "$BEST" "$DATASET_PATH/sparse/0"
echo "Registered $BEST_N / $TOTAL images (HARD=$USED); model written to $DATASET_PATH/sparse/0"
if too_few "$BEST_N" && [ "$USED" -lt 2 ]; then
  echo "Warning: fewer than 90% of the photos registered; run again with HARD=$((USED + 1))" \
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
