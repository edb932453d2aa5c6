#!/usr/bin/env bash
# The one-shot GPU check, for one H100/H200 in at most 8 minutes:
#   (0) install DeepSpeed and its missing dependencies from a carried folder (pip --no-index; the GPU image has
#       torch, triton, transformers and peft but no deepspeed, mosaicml-streaming or mlflow, and no network);
#   (1) the fused attention kernels in bf16 against the fp32 reference (benchmarks/attention.py --check), at
#       1,024 tokens and at an odd length with xlarge's head dimension 80;
#   (2) a one-GPU ZeRO-3 bf16 run of benchmarks/train_step.py that saves a checkpoint, a second run that
#       resumes it (its losses must repeat the first run's post-save losses) and consolidates it with
#       biomedgpt.checkpoint.consolidate (weights compared with the resumed engine's);
#   (3) the MFU benchmark for base, large and xlarge, eager and fused;
#   (4) the attention benchmark (fused vs SDPA with the materialised bias vs reference, fwd+bwd, 1,024 tokens).
# Every stage runs under `timeout`; a failing stage does not stop the later ones. Writes $OUT/gpu_check.json and
# $OUT/gpu_check.md (the summary says which stages passed) and each stage's log and JSON.
#
#   benchmarks/gpu_check_prepare.sh                  # HERE, with network: fills benchmarks/gpu_wheels/
#   OUT=/some/dir benchmarks/gpu_check.sh [--wheels DIR] [--python PY] [--out DIR]      # on the GPU machine
#   benchmarks/gpu_check.sh --rehearse-on-cpu [--out DIR]                                # here, end to end
#
# --rehearse-on-cpu builds a venv that holds only torch, transformers and their dependencies (linked from this
# project's .venv; no deepspeed, mosaicml-streaming, mlflow, pyarrow or pillow), then runs stages 0-4 in it on the CPU at tiny sizes (kernels under TRITON_INTERPRET=1, fp32).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="$ROOT/benchmarks/gpu_wheels"
PY="${PYTHON:-python3}"
OUT="${OUT:-$ROOT/gpu_check_out}"
REHEARSE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) WHEELS="$2"; shift 2 ;;
    --python) PY="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --rehearse-on-cpu) REHEARSE=1; shift ;;
    -h|--help) sed -n 2,22p "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" LOCAL_WORLD_SIZE=1 PYTHONUNBUFFERED=1
STARTED=$(date +%s)
cd "$ROOT" || exit 2
STAGES_FILE="$OUT/stages.jsonl"
: >"$STAGES_FILE"

if [ "$REHEARSE" = 1 ]; then
  # ---- the simulated GPU image: torch + transformers (+ their requirements) only, no system site packages
  SOURCE_PY="${SOURCE_PY:-/work/main/.venv/bin/python}"
  [ -x "$SOURCE_PY" ] || SOURCE_PY="$ROOT/.venv/bin/python"
  IMAGE="${REHEARSAL_VENV:-/tmp/gpu_check_rehearsal_venv}"
  BASE_PY=$("$SOURCE_PY" -c 'import sys, os; print(os.path.join(sys.base_prefix, "bin", "python3"))')
  if [ -e "$IMAGE" ]; then  # delete only a venv this script made before (it carries the marker)
    [ -f "$IMAGE/.gpu_check_rehearsal" ] || { echo "gpu_check: $IMAGE exists and is not a rehearsal venv; set REHEARSAL_VENV" >&2; exit 2; }
    rm -rf "$IMAGE"
  fi
  "$BASE_PY" -m venv "$IMAGE" || exit 2
  touch "$IMAGE/.gpu_check_rehearsal"
  # the venv's own setuptools goes: the image has one only as torch's requirement (linked below if so)
  "$IMAGE/bin/python" -m pip uninstall -q -y setuptools >/dev/null 2>&1
  SITE=$("$IMAGE/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  # The links live in a folder of their own on sys.path (a .pth file), not in the venv's site-packages: pip then
  # treats them as installed outside the venv and can never write through a link into the source .venv.
  mkdir -p "$IMAGE/image-site" && echo "$IMAGE/image-site" >"$SITE/_gpu_check_image.pth"
  "$SOURCE_PY" - "$IMAGE/image-site" <<'EOF' || exit 2
"""Link torch's, transformers' and psutil's (peft's) installed distributions and their requirements' into a folder."""
import os, sys
from importlib.metadata import PackageNotFoundError, distribution
from packaging.requirements import Requirement

site = sys.argv[1]
todo, seen, linked = [("torch", ()), ("transformers", ()), ("psutil", ())], set(), set()
while todo:
    name, extras = todo.pop()
    name = name.lower().replace("_", "-")
    if (name, extras) in seen:
        continue
    seen.add((name, extras))
    try:
        dist = distribution(name)
    except PackageNotFoundError:
        continue  # an optional platform dependency not installed here
    for req in dist.requires or []:
        r = Requirement(req)
        if r.marker is None or any(r.marker.evaluate({"extra": e}) for e in ("", *extras)):
            todo.append((r.name, tuple(sorted(r.extras))))
    root = str(dist.locate_file(""))
    for path in dist.files or []:
        top = str(path).split("/")[0]
        if top.startswith("..") or top in linked or top == "__pycache__":
            continue
        source = os.path.join(root, top)
        if os.path.exists(source):
            os.symlink(source, os.path.join(site, top))
            linked.add(top)
print(f"simulated image: {len(linked)} top-level entries linked from {len({n for n, _ in seen})} requirements")
EOF
  PY="$IMAGE/bin/python"
  absent=$("$PY" -c '
import importlib.util
print(" ".join(m for m in ("deepspeed", "streaming", "mlflow", "pyarrow", "PIL") if importlib.util.find_spec(m)))')
  if [ -n "$absent" ]; then echo "gpu_check: the simulated image unexpectedly has: $absent" >&2; exit 2; fi
  export TRITON_INTERPRET=1  # from process start, for every stage (triton reads it at import)
  DEVICE=cpu
else
  DEVICE=cuda
fi

# ---- helpers
stage() {  # stage NAME BUDGET_S COMMAND...: run with a time limit, log to $OUT/NAME.log, record the outcome
  local name="$1" budget="$2"; shift 2
  local t0 rc pid dog status secs
  t0=$(date +%s)
  echo "== stage $name (budget ${budget}s): $*"
  rm -f "$OUT/.$name.timed_out"
  # a subshell (shell functions and arrays work in it) in its own process group (set -m), so the watchdog's
  # kill reaches the Python processes it started
  set -m
  ( "$@" ) >"$OUT/$name.log" 2>&1 &
  pid=$!
  ( sleep "$budget"; touch "$OUT/.$name.timed_out"; kill -TERM -- "-$pid" 2>/dev/null; sleep 15
    kill -KILL -- "-$pid" 2>/dev/null ) >/dev/null 2>&1 &
  dog=$!
  set +m
  wait "$pid"; rc=$?
  kill -- "-$dog" 2>/dev/null; kill "$dog" 2>/dev/null; wait "$dog" 2>/dev/null
  secs=$(( $(date +%s) - t0 )); status=passed
  [ "$rc" -eq 0 ] || status=failed
  [ "$rc" -eq 3 ] && status="partial"  # a stage's own code for "ran, but could not check everything"
  if [ -e "$OUT/.$name.timed_out" ]; then status="timed out"; rm -f "$OUT/.$name.timed_out"; fi
  printf '{"stage": "%s", "status": "%s", "rc": %d, "seconds": %d, "budget_s": %d, "log": "%s.log"}\n' \
    "$name" "$status" "$rc" "$secs" "$budget" "$name" >>"$STAGES_FILE"
  echo "   $status (rc $rc, ${secs}s); last lines:"; tail -n 4 "$OUT/$name.log" | sed 's/^/   | /'
  return "$rc"
}

# pip sees only the carried folder: no pip.conf, find-links, extra indexes or constraints of the machine it runs on
export PIP_CONFIG_FILE=/dev/null
unset PIP_FIND_LINKS PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_CONSTRAINT PIP_REQUIREMENT
# DeepSpeed 0.19.8's requirements (its requirements/requirements.txt, nvidia-ml-py on CUDA), what building its sdist
# needs, and sentencepiece (biomedgpt's tokenizer); gpu_check_prepare.sh downloads the same list
DEPS="setuptools wheel hjson py-cpuinfo einops msgpack ninja psutil packaging tqdm typing-extensions
annotated-types typing-inspection pydantic-core pydantic nvidia-ml-py sentencepiece"  # numpy: the image has it (transformers)
[ "$REHEARSE" = 1 ] && DEPS="${DEPS/nvidia-ml-py/}"  # deepspeed asks for it only where torch sees a CUDA GPU
# ---- stage 0: install what the image lacks from the carried folder (pip resolves only the missing ones)
install_deps() {
  [ -d "$WHEELS" ] || { echo "no wheel folder $WHEELS: run benchmarks/gpu_check_prepare.sh where pip has an index"; return 2; }
  if "$PY" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)'; then
    echo "installing into the venv $("$PY" -c 'import sys; print(sys.prefix)')"
  else  # the image's own Python: a venv on top of it, so its packages stay as they are
    local venv="${GPU_CHECK_VENV:-/tmp/gpu_check_venv}"
    if [ -x "$venv/bin/python" ] || "$PY" -m venv --system-site-packages "$venv"; then
      PY="$venv/bin/python"
      echo "installing into $venv (with the image's site packages visible)"
    else  # no venv module on the image: a folder of its own on PYTHONPATH
      TARGET=(--target "$SITE_DIR"); mkdir -p "$SITE_DIR"
      echo "no venv module: installing into $SITE_DIR (PYTHONPATH)"
    fi
  fi
  printf 'PY=%q\n' "$PY" >"$OUT/.python_env"  # for the later stages (this function runs in a subshell)
  "$PY" -m pip --version || return 2
  if "$PY" -c 'import deepspeed' 2>/dev/null; then echo "deepspeed already importable"; return 0; fi
  # what the image has stays as it is: its versions are constraints of every install below
  "$PY" -m pip list --format=freeze 2>/dev/null | grep '==' >"$OUT/image_constraints.txt"
  # Each missing distribution alone (--no-deps): pip's resolver would otherwise walk torch's CUDA requirements,
  # which an image may satisfy differently than its metadata says, and try to replace torch.
  local missing
  missing=$("$PY" - $DEPS <<'PYEOF'
import sys
from importlib.metadata import PackageNotFoundError, version
out = []
for name in sys.argv[1:]:
    try:
        version(name)
    except PackageNotFoundError:
        out.append(name)
print(" ".join(out))
PYEOF
)
  echo "missing here: ${missing:-nothing}"
  if [ -n "$missing" ]; then
    # shellcheck disable=SC2086
    "$PY" -m pip install --no-index --find-links "$WHEELS" -c "$OUT/image_constraints.txt" --no-deps \
      "${TARGET[@]}" $missing ||
      return 2
  fi
  # no isolated build env (it would need an index and torch): the sdist builds against the image's torch
  DS_BUILD_OPS=0 "$PY" -m pip install --no-index --find-links "$WHEELS" -c "$OUT/image_constraints.txt" \
    --no-build-isolation --no-deps --no-cache-dir "${TARGET[@]}" deepspeed || return 2  # no cache: really build the sdist
  "$PY" -c 'import deepspeed, torch; print("deepspeed", deepspeed.__version__, "torch", torch.__version__)'
}
SITE_DIR="${GPU_CHECK_SITE:-/tmp/gpu_check_site}"
TARGET=()
export PYTHONPATH="$PYTHONPATH:$SITE_DIR"  # used only when the image has no venv module (see install_deps)
rm -f "$OUT/.python_env"
# limits: 90 + 60 + 120 + 180 + 30 s = 8 minutes on the GPU; the rehearsal on a shared 2-core CPU gets more
B0=90; [ "$REHEARSE" = 1 ] && B0=240
stage install "$B0" install_deps
# install_deps ran in a subshell: the Python it chose is picked up here
# shellcheck disable=SC1091
[ -f "$OUT/.python_env" ] && . "$OUT/.python_env" && rm -f "$OUT/.python_env"
"$PY" - >"$OUT/image.json" <<'EOF'
import importlib.util, json, platform
mods = ("torch", "triton", "transformers", "peft", "deepspeed", "streaming", "mlflow", "pyarrow", "PIL", "numpy")
print(json.dumps({"python": platform.python_version(), "importable": {m: importlib.util.find_spec(m) is not None for m in mods}}))
EOF

if [ "$REHEARSE" = 1 ]; then
  ATT_BIG=(--length 40 --patches 19 --batch 2 --heads 2 --head-dim 16)
  ATT_ODD=(--length 23 --patches 9 --batch 2 --heads 2 --head-dim 80)
  BENCH_ATT=(--length 40 --patches 19 --batch 2 --heads 2 --head-dim 16 --warmup 1 --repeats 2)
  SMALL=(--batch 2 --image-size 64 --patches 8 --text-len 8 --target-len 6)
  CKPT_ARGS=(--sizes tiny --variants eager "${SMALL[@]}")
  MFU_ARGS=(--sizes tiny --variants eager,fused --zero 3 --ckpt none "${SMALL[@]}" --warmup 0 --steps 1)
  B1=200; B2=420; B3=300; B4=90
else
  ATT_BIG=(--length 1024 --patches 576 --batch 4 --heads 16 --head-dim 64)
  ATT_ODD=(--length 777 --patches 300 --batch 3 --heads 16 --head-dim 80)
  BENCH_ATT=(--length 1024 --patches 576 --batch 8 --heads 16 --head-dim 64 --warmup 5 --repeats 20)
  CKPT_ARGS=(--sizes "${CKPT_SIZE:-base}" --variants fused --batch 8)
  MFU_ARGS=(--sizes base,large,xlarge --variants eager,fused --zero 2 --ckpt none --batch "${MFU_BATCH:-64}"
            --warmup 3 --steps 8)
  B1=60; B2=120; B3=180; B4=30
fi

# ---- stage 1: kernels against the reference
kernels() {
  "$PY" benchmarks/attention.py --check --device "$DEVICE" "${ATT_BIG[@]}" --json "$OUT/kernels_1024.json" &&
    "$PY" benchmarks/attention.py --check --device "$DEVICE" "${ATT_ODD[@]}" --json "$OUT/kernels_odd.json"
}
stage kernels "$B1" kernels

# ---- stage 2: ZeRO-3 bf16 checkpoint: save, resume that continues, consolidation
checkpoint_round_trip() {
  local ck="$OUT/zero3_checkpoint"
  rm -rf "$ck" "$OUT/consolidated"  # this stage's own outputs of an earlier run
  local common=("${CKPT_ARGS[@]}" --zero 3 --ckpt none --vocab tokenizer --warmup 0 --no-flop-count --device "$DEVICE")
  "$PY" benchmarks/train_step.py "${common[@]}" --steps 2 --save-checkpoint "$ck" --after-save-steps 2 \
    --json "$OUT/ckpt_save.json" || return 1
  local consolidate=(--consolidate "$OUT/consolidated")
  if ! "$PY" -c 'import biomedgpt.checkpoint.consolidate'; then  # its error, if any, is printed above
    echo "consolidation NOT RUN: biomedgpt.checkpoint.consolidate does not import on this image"
    consolidate=()
  fi
  "$PY" benchmarks/train_step.py "${common[@]}" --steps 2 --resume "$ck" "${consolidate[@]}" \
    --json "$OUT/ckpt_resume.json" || return 1
  "$PY" - "$OUT/ckpt_save.json" "$OUT/ckpt_resume.json" "${#consolidate[@]}" <<'EOF'
import json, math, sys
saved = json.load(open(sys.argv[1]))["variants"][0]
resumed = json.load(open(sys.argv[2]))["variants"][0]
a, b = saved["losses_after_save"], resumed["losses"]
print(f"resumed at step {resumed['resumed_from_step']} (saved at {saved['saved_at_step']}); losses after save {a}, "
      f"after resume {b}")
ok = resumed["resumed_from_step"] == saved["saved_at_step"]
ok &= all(math.isclose(x, y, rel_tol=2e-2) for x, y in zip(a, b))  # bf16 kernels need not be bit-repeatable
if int(sys.argv[3]):
    c = resumed.get("consolidation", {})
    print("consolidation:", c)
    ok &= bool(c.get("equal"))
elif ok:
    print("save and resume passed; consolidation not checked (partial)")
    sys.exit(3)
sys.exit(0 if ok else 1)
EOF
}
stage checkpoint "$B2" checkpoint_round_trip

# ---- stage 3: MFU benchmark
stage mfu "$B3" "$PY" benchmarks/train_step.py "${MFU_ARGS[@]}" --device "$DEVICE" \
  --json "$OUT/train_step.json" --markdown "$OUT/train_step.md"

# ---- stage 4: attention benchmark
stage attention "$B4" "$PY" benchmarks/attention.py --device "$DEVICE" "${BENCH_ATT[@]}" \
  --json "$OUT/attention.json"

# ---- summary
"$PY" - "$OUT" "$REHEARSE" "$(( $(date +%s) - STARTED ))" <<'EOF'
import json, sys
from pathlib import Path

out, rehearse, seconds = Path(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3])
stages = [json.loads(line) for line in (out / "stages.jsonl").read_text().splitlines() if line.strip()]

def load(name):
    path = out / name
    return json.loads(path.read_text()) if path.is_file() else None

summary = {"rehearsal_on_cpu": rehearse, "seconds": seconds, "stages": stages, "image": load("image.json"),
           "results": {n: load(f"{n}.json") for n in ("kernels_1024", "kernels_odd", "ckpt_save", "ckpt_resume",
                                                        "train_step", "attention")}}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
lines = [f"# gpu_check {'rehearsal on CPU (proves the script, not GPU speed)' if rehearse else 'on GPU'}", "",
         f"Total {seconds} s. Image: {summary['image']}", "", "| stage | status | seconds / budget |", "|---|---|---:|"]
lines += [f"| {s['stage']} | {s['status']} | {s['seconds']} / {s['budget_s']} |" for s in stages]
ts = out / "train_step.md"
if ts.is_file():
    lines += ["", "## MFU benchmark", "", ts.read_text()]
att = summary["results"]["attention"]
if att and "variants" in att:
    lines += ["", "## Attention, forward + backward", "", "| variant | median ms |", "|---|---:|"]
    lines += [f"| {r['variant']} | {r.get('median_ms', float('nan')):.2f} |" for r in att["variants"]]
    if "sdpa_over_triton" in att:
        lines += ["", f"sdpa / triton = {att['sdpa_over_triton']:.2f}x (target 3x on GPU)"]
(out / "gpu_check.md").write_text("\n".join(lines) + "\n")
passed = sum(s["status"] == "passed" for s in stages)
partial = [s["stage"] for s in stages if s["status"] == "partial"]
print(f"gpu_check: {passed}/{len(stages)} stages passed: " + ", ".join(f"{s['stage']} {s['status']}" for s in stages))
print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
sys.exit(0 if passed == len(stages) else 3 if passed + len(partial) == len(stages) else 1)
EOF
