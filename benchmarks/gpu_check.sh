#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one pass: the GPU-marked tests of every unit graded on the
# solutions (all must pass) and on the stubs (all must fail), the GPU mutants (each must lose a test),
# then the GPU figures of the benchmarks.
# Usage: PYTHON=python3 OUT=/tmp/gpu bash benchmarks/gpu_check.sh
set -u
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
$PY -c 'import torch; print("torch", torch.__version__, "on", torch.cuda.get_device_name())' || exit 2
status=0
for who in solutions exercises; do
  echo "=== GPU tests graded on $who"
  $PY -m autograder grade "$who" --only gpu --gpu require --jobs "${JOBS:-1}" --json "$OUT/$who.json" || status=1
done
$PY - "$OUT" <<'PY' || status=1
import json, sys
out = sys.argv[1]
solved, stubs = (json.load(open(f"{out}/{who}.json")) for who in ("solutions", "exercises"))
def tests(report):
    return {(u["id"], t["name"]): t for u in report["units"] for t in u["tests"]}
bad = [f"solution {k}: {t['status']}: {t['output'][:400]}" for k, t in tests(solved).items() if t["status"] != "passed"]
bad += [f"stub {k}: passed" for k, t in tests(stubs).items() if t["status"] == "passed"]
print(f"{len(tests(solved))} GPU tests; problems: {len(bad)}")
print("\n".join(bad))
sys.exit(1 if bad or not tests(solved) else 0)
PY
echo "=== GPU mutants"
$PY -m benchmarks.gpu_mutants 2>&1 | tee "$OUT/gpu-mutants.txt" || status=1
echo "=== grade-all: a CPU pass, then the GPU pass merged into the same gradebook (unit1)"
rm -rf "$OUT/batch" && mkdir -p "$OUT/batch/subs"
cp -r solutions "$OUT/batch/subs/solved" && cp -r exercises "$OUT/batch/subs/untouched"
$PY -m autograder grade-all "$OUT/batch/subs" --csv "$OUT/batch/gradebook.csv" --unit unit1 --jobs 2 || status=1
cp "$OUT/batch/gradebook.csv" "$OUT/gradebook-cpu.csv"
$PY -m autograder grade-all "$OUT/batch/subs" --csv "$OUT/batch/gradebook.csv" --unit unit1 --jobs 2 --only gpu || status=1
cp "$OUT/batch/gradebook.csv" "$OUT/gradebook-gpu.csv"
cat "$OUT/gradebook-cpu.csv" "$OUT/gradebook-gpu.csv"
for unit in ${BENCH_UNITS-unit2 unit4 unit5 unit7 unit8}; do
  echo "=== benchmarks.$unit"
  timeout "${BENCH_TIMEOUT:-120}" $PY -m benchmarks.$unit 2>&1 | tee "$OUT/bench-$unit.txt" || status=1
done
exit $status
