#!/usr/bin/env bash
# The course at full scale on a GPU, through the original model's own remote code (transformers 4.33.2): one
# command on the GPU machine, after one preparation here.
#
#   scripts/original_course_gpu.sh --prepare   # here: .cache/original-gpu/ (xcomp_lab.tools.original_gpu_run
#                                              # --prepare: the model's files and the wheels of transformers 4.33.2
#                                              # and its pins) and, in it, course-wheels/: the driver's and the
#                                              # kernel's wheels of .whl (scripts/device_wheels.sh) without
#                                              # transformers 5 and its pins, so that one carried folder (about
#                                              # 37 MB) holds all
#   scripts/original_course_gpu.sh             # on the GPU machine (carry .cache/original-gpu), writes
#                                              # $OUT/original-full-h200.tgz: the edition and the run's folder
#
# On the GPU machine the course's driver (papermill, nbconvert) runs from /tmp/site; the original's environment is
# /tmp/original-site (the same wheels for the kernel, then transformers 4.33.2, huggingface_hub 0.36.2, accelerate
# 0.23.0 and bitsandbytes) beside the image's torch, torchvision, einops and sentencepiece, reached through
# ORIGINAL_VENV=/tmp/venv-original, whose bin/python runs the image's python3 with only that folder and this
# checkout on PYTHONPATH (xcomp_lab.original.kernel registers it as the notebooks' kernel). The full-size
# checkpoint is built there with random FP16 weights by xcomp_lab.model.original.build_original_checkpoint from the
# carried remote-code files (17 GB of shards, under $XCOMP_LAB_CACHE), and the course runs on it:
# python -m xcomp_lab.tools.course --model-name-or-path <it>. Knobs: SCALE (full), DEVICE (cuda), ONLY (notebook
# prefixes, e.g. "00 01"; all by default), EDITION_NAME (original-full-h200), SEED (a folder holding an earlier
# call's run folder, copied into the run's before it starts: an --only run then publishes its notebooks with those
# of the earlier call), LIMIT_S (seconds after which the course is interrupted as Ctrl-C would: it records where it
# stopped and the tar still gets made), NOTEBOOKS (the folder of executed
# notebooks the course runs, default notebooks/: rebuild them from notebooks/src first, scripts/build_notebooks.py).
set -euo pipefail
cd "$(dirname "$0")/.."
CODE_DIR=${CODE_DIR:-../shared/reference/internlm-xcomposer2-vl-7b}
PREPARED=.cache/original-gpu
if [ "${1:-}" = "--prepare" ]; then
  [ -d .whl ] || scripts/device_wheels.sh
  # the tokenizer is trained with sentencepiece, which only the original's environment has (make venv-original)
  [ -d $PREPARED/wheels ] || .venv-original/bin/python -m xcomp_lab.tools.original_gpu_run --prepare --code-dir "$CODE_DIR"
  rm -rf $PREPARED/course-wheels && mkdir -p $PREPARED/course-wheels
  cp $(ls .whl/*.whl | grep -v -E '/(transformers|tokenizers|huggingface_hub|accelerate|bitsandbytes|hf_xet)-') \
    $PREPARED/course-wheels/
  du -sh $PREPARED
  exit 0
fi
: "${OUT:?set OUT to the folder the results go to (the device machine sets it)}"
SCALE=${SCALE:-full} DEVICE=${DEVICE:-cuda} EDITION_NAME=${EDITION_NAME:-original-full-h200}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false XCOMP_LAB_CACHE=${XCOMP_LAB_CACHE:-/tmp/xcomp-lab-cache}
python3 -m pip install -q --no-index --no-deps --target /tmp/site $PREPARED/course-wheels/*.whl
export PYTHONPATH=/tmp/site:$PWD JUPYTER_PATH=/tmp/site/share/jupyter
python3 -m pip install -q --no-index --no-deps --target /tmp/original-site $PREPARED/course-wheels/*.whl \
  $PREPARED/wheels/*.whl
export ORIGINAL_VENV=/tmp/venv-original
mkdir -p $ORIGINAL_VENV/bin
printf '#!/bin/sh\nPYTHONPATH=/tmp/original-site:%s exec %s "$@"\n' "$PWD" "$(command -v python3)" > $ORIGINAL_VENV/bin/python
chmod +x $ORIGINAL_VENV/bin/python
touch $ORIGINAL_VENV/.xcomp-lab-carried-wheels
checkpoint=$(python3 -c "import sys; from xcomp_lab.model.original import build_original_checkpoint as b; \
print(b(sys.argv[1], sys.argv[2]).path)" "$PREPARED/files/full/internlm-xcomposer2-vl-7b" "$SCALE")
echo "checkpoint: $checkpoint"
only=()
[ -n "${ONLY:-}" ] && only=(--only $ONLY)
mkdir -p "$OUT/course"
[ -n "${SEED:-}" ] && cp -r "$SEED"/. "$OUT/course/"
status=0
timeout -s INT -k 30 "${LIMIT_S:-86400}" python3 -m xcomp_lab.tools.course --scale "$SCALE" --device "$DEVICE" \
  --model-name-or-path "$checkpoint" --notebooks "${NOTEBOOKS:-notebooks}" --output "$OUT/course" \
  --edition "$OUT/$EDITION_NAME" "${only[@]}" || status=$?
tar czf "$OUT/$EDITION_NAME.tgz" -C "$OUT" course $([ -d "$OUT/$EDITION_NAME" ] && echo "$EDITION_NAME")
rm -rf "$OUT/course" "$OUT/$EDITION_NAME"
exit $status
