#!/usr/bin/env bash
# Fill the folder gpu_check.sh installs from (default benchmarks/gpu_wheels/, git-ignored) on a machine that can
# reach a package index: DeepSpeed 0.19.8's source package and the small dependencies the GPU image lacks
# (that image has Python 3.12, torch 2.11, triton, transformers 5.x and peft, and nothing can be fetched there).
# Binary wheels are fetched for CPython 3.12 (the GPU image) and for this machine's Python (the rehearsal).
# Versions are the ones this project's .venv has, so the GPU run uses what was tested here.
#
#   benchmarks/gpu_check_prepare.sh [DIR]      # then: benchmarks/gpu_check.sh --wheels DIR (on the GPU machine)
#
# (psutil, packaging and tqdm too, in case the image lacks them; gpu_check.sh installs only what is missing.)
# Not carried: pyarrow (50 MB) and pillow; the scripts gpu_check.sh runs (train_step.py, attention.py, consolidation)
# import neither.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${1:-$ROOT/benchmarks/gpu_wheels}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=/work/main/.venv/bin/python
[ -x "$PY" ] || { echo "gpu_check_prepare: no Python with pip at $PY; set PYTHON=" >&2; exit 2; }
mkdir -p "$DIR"
# ignored by git from inside (no edit of the repository's .gitignore); the device tool's `carry` names the folder
[ -f "$DIR/.gitignore" ] || printf '*\n' >"$DIR/.gitignore"

# name==version from this venv (dist names as pip knows them)
pins=$("$PY" - <<'EOF'
from importlib.metadata import version
names = ["deepspeed", "hjson", "py-cpuinfo", "einops", "msgpack", "ninja", "psutil", "pydantic", "pydantic-core",
         "annotated-types", "typing-inspection", "nvidia-ml-py", "setuptools", "wheel", "sentencepiece", "packaging", "tqdm"]
out = []
for name in names:
    try:
        out.append(f"{name}=={version(name)}")
    except Exception:
        out.append(name)  # not here (nvidia-ml-py on a CPU machine): the newest
print(" ".join(out))
EOF
)
echo "pins: $pins"
read -r -a PINS <<<"$pins"
DS_PIN="${PINS[0]}"
DEPS=("${PINS[@]:1}")

"$PY" -m pip download -q --no-deps --no-binary=deepspeed -d "$DIR" "$DS_PIN"
here_tag=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')
for pyver in 312 "$here_tag"; do
  "$PY" -m pip download -q --only-binary=:all: --no-deps -d "$DIR" \
    --implementation cp --python-version "$pyver" --abi "cp$pyver" --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 --platform any \
    "${DEPS[@]}"
done
"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$DIR" "typing-extensions" 2>/dev/null || true
ls -la "$DIR"
bytes=$(du -sb "$DIR" | cut -f1)
echo "gpu_check_prepare: $(ls "$DIR" | wc -l) files, $((bytes / 1024 / 1024)) MiB ($bytes bytes) in $DIR"
if [ "$bytes" -gt $((20 * 1024 * 1024)) ]; then
  echo "gpu_check_prepare: more than 20 MiB: the working tree travels with at most 64 MiB" >&2
  exit 1
fi
