#!/usr/bin/env bash
# The GPU checks of issue "On a real GPU", in one run on the lent GPU machine (../shared/GPU.md):
#   run (device tool) with carry [".whl"]:  bash tools/gpu_check.sh
# Each step has its own timeout and log under $OUT; $OUT/summary.json says what passed, with the numbers.
# Steps: install, pytest -m gpu, the conformance kit on cuda (world 3 on cuda:0,0,0 with peer; nccl at world 1 and
# its refusal of a duplicate GPU are in the pytest step), fixture and 125M models on cuda vs cpu-sim, a decode
# profile, and prefill/decode speed against transformers + PyTorch on the same GPU.
# STEPS="pytest models" limits the run to those steps (names as in the summary).
set -uo pipefail
OUT="${OUT:-/tmp/gpu-out}"
mkdir -p "$OUT"
STEPS="${STEPS:-install pytest models conformance vs_transformers bench threads}"
T0=$(date +%s)
declare -A RC SECS

step() {  # step NAME TIMEOUT CMD...
    local name=$1 limit=$2
    shift 2
    [[ " $STEPS " == *" $name "* || $name == install ]] || return 0
    local t=$(date +%s)
    echo "=== $name (limit ${limit}s): $*" | tee -a "$OUT/gpu.log"
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    RC[$name]=$?
    SECS[$name]=$(($(date +%s) - t))
    tail -n 25 "$OUT/$name.log" | tee -a "$OUT/gpu.log"
    echo "=== $name: rc=${RC[$name]} in ${SECS[$name]}s" | tee -a "$OUT/gpu.log"
}

install() {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
        python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . &&
        python3 -c "import tensorweave as tw, cupy; print(tw.devices('cuda:0'), cupy.__version__)"
}
export -f install
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
step install 60 bash -c install
# A per-test limit where the image has pytest-timeout (no extra installs it); the step's own limit holds regardless.
PER_TEST=$(python3 -c 'import pytest_timeout' 2>/dev/null && echo "--timeout 60")
# shellcheck disable=SC2086
step pytest 150 python3 -m pytest -m gpu -q -p no:cacheprovider $PER_TEST --junitxml="$OUT/pytest.xml" tests
BENCH=/tmp/tw-bench-125m
step models 100 python3 tools/gpu_models.py --out "$OUT" --bench-model "$BENCH" --split 3,1,1
step conformance 120 python3 -m tensorweave.cli conformance --backend cuda --devices cuda:0,0,0 --communicator peer \
    --world-size 3 --report "$OUT/conformance.json"
step vs_transformers 100 python3 benchmarks/vs_transformers.py --dir "$BENCH" --torch-device cuda \
    --devices cuda:0 cuda:0,0,0 -ts 3,1,1 --communicator peer --runs 3 --json
step bench 50 python3 -m tensorweave.cli bench "$BENCH" --devices cuda:0,0,0 -ts 3,1,1 --communicator peer \
    -p 64 -n 32 -r 3 --json
# Is the split run's slow decode the three device threads contending for the GIL? Decode speed at the default
# switch interval (5 ms) and at 0.1 ms, same process, same model.
step threads 60 python3 -c "
import sys, tensorweave as tw
from tensorweave.runtime.bench import bench
with tw.load('$BENCH', tw.devices('cuda:0,0,0'), [3, 1, 1], communicator='peer', ctx=64, progress=False) as m:
    for interval in (sys.getswitchinterval(), 1e-4, sys.getswitchinterval()):
        sys.setswitchinterval(interval)
        print('switch interval', interval, 'tg16 t/s', round(bench(m, 0, 16, 2, 0).tests[0].tps_mean, 2), flush=True)
"

python3 - "$OUT" "$(($(date +%s) - T0))" "${!RC[@]}" -- "${RC[@]}" -- "${SECS[@]}" <<'EOF'
import json, sys, pathlib, xml.etree.ElementTree as ET
out, total = pathlib.Path(sys.argv[1]), int(sys.argv[2])
rest = sys.argv[3:]
a = rest.index("--"); b = rest.index("--", a + 1)
names, rcs, secs = rest[:a], rest[a + 1:b], rest[b + 1:]
summary = {"seconds": total, "steps": {n: {"rc": int(r), "seconds": int(s)} for n, r, s in zip(names, rcs, secs)}}
if (out / "pytest.xml").exists():
    suite = ET.parse(out / "pytest.xml").getroot().find("testsuite")
    summary["pytest"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    summary["pytest"]["failed"] = [
        c.get("classname", "") + "::" + c.get("name", "") for c in suite.iter("testcase")
        if c.find("failure") is not None or c.find("error") is not None]
if (out / "models.json").exists():
    summary["models"] = json.loads((out / "models.json").read_text())
if (out / "conformance.json").exists():
    d = json.loads((out / "conformance.json").read_text())
    summary["conformance"] = {k: d[k] for k in ("summary", "exit_status", "duration_s")}
    summary["conformance"]["not_passed"] = [t for t in d["tests"] if t["outcome"] not in ("passed", "not_supported")]
for name in ("bench", "vs_transformers"):
    f = out / f"{name}.log"
    if f.exists():
        text = f.read_text()
        try:
            data = json.loads(text[text.index("{"):text.rindex("}") + 1])
            for r in data.get("results", []):
                r.pop("tokens", None)  # the greedy tokens: compared in the script, too long for the summary
            summary[name] = data
        except ValueError:
            summary[name] = text[-2000:]
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary["steps"]), "total", total, "s")
EOF
# The device tool brings back only a few files: the summary, the overview log, the profile, and the rest packed.
cd "$OUT" && tar czf logs.tgz --remove-files $(ls | grep -v -E '^(summary.json|gpu.log|profile.txt)$')
