#!/usr/bin/env bash
# The GPU session script (2026-12-04): one device call runs one or more steps, writing logs and JSON under $OUT.
#   bash benchmarks/gpu_session.sh STEP...   (steps: vision vltests serving mixed long attention attdecode quant quantmodel quantacc parallel layered suite)
# serving needs fastapi / starlette / uvicorn / pydantic / pydantic-core / annotated-types / typing-inspection /
# opentelemetry-api carried as wheels in .whl/ (the device README's recipe); every step bounds itself with timeout.
export LD_PRELOAD=/lib/x86_64-linux-gnu/libstdc++.so.6 PYTHONUNBUFFERED=1
export PYTHONPATH=.
T0=$(date +%s)
git_rev=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/device.txt
for step in "$@"; do
  echo "== $step at $(( $(date +%s) - T0 )) s"
  case $step in
    vision)
      timeout 330 python -m benchmarks.vision --ttft --profile --out $OUT/vision.json 2>&1 | grep -v -E "warn|return cls.__new__" | tee $OUT/vision.log ;;
    vltests)
      timeout 240 python -m pytest -m gpu -q -rfEs -p no:cacheprovider tests/test_vl_gpu.py 2>&1 | tail -15 | tee $OUT/vltests.log ;;
    serving)
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
      PYTHONPATH=/tmp/site:. timeout 560 python -m benchmarks.serving --slice 2 --max-batch 64 --reliability 1000 \
        --concurrency 64 --load 300 --rate 30 --prompt-range 128,8192 --output-range 16,512 --prefix-ttft 8192 \
        --token-budget 2048 --out $OUT/serving.json 2>&1 | grep -v -E "warn|return cls.__new__" | tee $OUT/serving.log ;;
    mixed)  # issue 13's mixed steps: the GPU tests, then the serving load with separate calls, mixed steps and static batching
      timeout 200 python -m pytest -m gpu -q -rfEs -p no:cacheprovider tests/test_mixed.py 2>&1 | grep -v -E "Warning|warnings.warn|^  " | tail -8 | tee $OUT/mixed_tests.log
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
      PYTHONPATH=/tmp/site:. timeout 400 python -m benchmarks.serving --slice 2 --max-batch 64 --mixed-step --reliability 200 \
        --load 300 --rate 30 --prompt-range 128,8192 --output-range 16,512 --token-budget 2048 \
        --out $OUT/serving_mixed.json 2>&1 | grep -v -E "warn|return cls.__new__|aligned" | tee $OUT/serving_mixed.log ;;
    long)
      timeout 560 python -m benchmarks.long_context --skip-sweep --prefill-lengths 32768 --decode-held 1048576 \
        --out $OUT/long.json 2>&1 | grep -v -E "warn|return cls.__new__" | tee $OUT/long.log ;;
    attention)
      timeout 440 python -m benchmarks.attention --page-size 256 --out $OUT/attention.json 2>&1 | grep -v -E "warn|return cls.__new__|UserWarning|scaled_dot_product" | tee $OUT/attention.log ;;
    attdecode)  # the decode cases only (ours and every peer in the same interleaved rounds)
      timeout 250 python -m benchmarks.attention --decode-only --page-size 256 --out $OUT/attention_decode.json 2>&1 | grep -v -E "warn|return cls.__new__|UserWarning|scaled_dot_product" | tee $OUT/attention_decode.log ;;
    quantmodel)  # the whole-model decode on the 2-layer slice, bf16 / int8 / fp8 experts, the default decode tiles
      timeout 330 python -m benchmarks.moe_quant --skip-op --model-layers 2 --accuracy-layers 0 --out $OUT/moe_quant_model.json 2>&1 | grep -v -E "Warning|warn|return cls" | tee $OUT/moe_quant_model.log ;;
    layered)  # compile time of the per-kind layer programs at real width, 2 and 8 layers (issue 12)
      # the skeleton is allocated on the GPU (8 real-width layers: ~110 GB in bf16): 8 layers on an H200 only
      mem=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
      layers=2; [ "${mem:-0}" -gt 100000 ] && layers=2,8
      timeout 420 python -m benchmarks.build_depth --device cuda --preset minimax-text-01 --layers $layers --layer-programs --out $OUT/build_depth_layered.json 2>&1 | grep -v -E "Warning|warn|return cls" | tee $OUT/build_depth_layered.log ;;
    quant)  # the quantized-experts GPU tests, then the whole benchmark with the decode-tile sweep
      timeout 120 python -m pytest -m gpu -q -p no:cacheprovider tests/test_moe_quant.py tests/test_plugins_gpu.py -k "fp8 or int8" 2>&1 | grep -v -E "Warning|warnings.warn|^  " | tail -12 | tee $OUT/quant_tests.log
      timeout 460 python -m benchmarks.moe_quant --sweep --out $OUT/moe_quant.json 2>&1 | grep -v -E "Warning|warn" | tee $OUT/moe_quant.log ;;
    quantacc)  # the 4-layer accuracy run with its equal-RMS noise control (op level and decode skipped)
      timeout 400 python -m benchmarks.moe_quant --skip-op --model-layers 0 --out $OUT/moe_quant_accuracy.json 2>&1 | grep -v -E "Warning|warn" | tee $OUT/moe_quant_accuracy.log ;;
    parallel)  # one rank's shapes under TP 8 (and EP) vs the single-GPU shapes; 2-rank CUDA TP / EP folders compile (fake world)
      timeout 400 python -m benchmarks.parallel_shapes --expert-parallel --out $OUT/parallel_shapes.json 2>&1 | grep -v -E "Warning|warn|return cls" | tee $OUT/parallel_shapes.log
      timeout 90 python build.py --preset tiny --device cuda --dtype bf16 --tensor-parallel 2 --max-batch 2 --max-input-len 8 --max-seq-len 64 --page-size 16 --out /tmp/tp2cuda 2>&1 | tail -3 | tee $OUT/parallel_build.log
      timeout 90 python build.py --preset tiny --device cuda --dtype bf16 --tensor-parallel 2 --expert-parallel --max-batch 2 --max-input-len 8 --max-seq-len 64 --page-size 16 --out /tmp/ep2cuda 2>&1 | tail -3 | tee -a $OUT/parallel_build.log
      ls -la /tmp/tp2cuda/rank0 /tmp/ep2cuda/rank1 2>&1 | tee -a $OUT/parallel_build.log ;;
    suite)
      run_shard() { local n=$1; shift; local s=$(date +%s)
        timeout 330 python -m pytest -m gpu -q -rfEs -p no:cacheprovider "$@" > $OUT/suite_$n.txt 2>&1
        echo "rc=$? t=$(( $(date +%s) - s ))" >> $OUT/suite_$n.txt; }
      run_shard a tests/test_attention_triton.py & run_shard b tests/test_runtime_gpu.py tests/test_mixed.py &
      run_shard c tests/test_aoti_triton.py & run_shard d tests/test_gpu_model.py &
      run_shard e tests/test_lightning_triton.py tests/test_moe_triton.py tests/test_vl_gpu.py &
      run_shard f tests/test_moe_ep_triton.py tests/test_plugins_gpu.py &
      wait
      for f in $OUT/suite_*.txt; do echo "== $f"; grep -v -i warn $f | tail -6; done
      (for f in $OUT/suite_*.txt; do echo "== shard $(basename $f .txt)"; grep -v -E "Warning|warnings.warn|return cls.__new__|^  " $f; done) > $OUT/suite.log; rm $OUT/suite_*.txt ;;
  esac
done
echo "== done at $(( $(date +%s) - T0 )) s, tree $git_rev"
