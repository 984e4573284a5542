#!/usr/bin/env bash
# Run stages on a lent GPU machine in one device call (see the README's notes for the next
# engineer). Each argument is NAME:COMMAND; its output goes to $OUT/NAME.txt with its exit status
# and wall time, so one failing stage neither hides the others nor leaves a daemon holding a pipe.
#   run: bash scripts/device_run.sh "tests:python3 -m pytest -q tests/test_gpu.py" "bench:python3 benchmarks/run.py --device cuda --size full"
#   carry: [".whl"]   (made by ../shared/tools/gpu-wheels.sh: pyzmq, msgpack, cffi for the GPU image)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PYTHONPATH || exit
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch; print(torch.__version__)" >> "$OUT/gpu.txt" 2>&1
for stage in "$@"; do
  name=${stage%%:*}; cmd=${stage#*:}
  start=$(date +%s)
  eval "$cmd" > "$OUT/$name.txt" 2>&1
  echo "rc=$? wall=$(( $(date +%s) - start ))s" >> "$OUT/$name.txt"
done
