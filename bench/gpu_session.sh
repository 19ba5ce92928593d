#!/usr/bin/env bash
# The GPU session of issue 8 in a few device calls (each call may run 600 s; a session has 1800 s).
#
#   bench/gpu_session.sh PHASE [PHASE ...]      (from the repository root, on the GPU machine)
#
# Phases, in the order worth running them:
#   setup     install the carried wheels (.whl/, see ../shared/device/README.md) and the project
#   designs   bench/time_designs.py: the three rank-one window designs (and design 3's knobs) at
#             2x32x128^3, fp32/bf16, both shift sets: ms, % of copy bandwidth, diff to design 1,
#             bitwise repeats, each kernel's ms and launches a call, the reference kernel (issue 16's deciding measurement: run it
#             first; its cases' kernels are compiled by 8 processes at once for up to 240 s,
#             then timed; DESIGNS_ARGS adds arguments, e.g. "--shortlist --compile-budget 140";
#             compiled and timed variant by variant, each in all four cases, the shortlist's in
#             priority order: a step cut at its limit keeps the first variants of every case).
#             Its JSON is also copied to runs/designs.json: the phases after it (v3tests,
#             layer, check's determinism) then run the variant with the fastest fp32 [None, 4]
#             forward + backward (bench/with_variant.py), not the code's default
#   schedule  bench/time_designs.py at 2x64x64^3 (16 chunks a stage against 132 programs), both
#             shift sets, fp32/bf16: design 3 with four tiles head by head (the default), in the
#             skewed stage order, with batch*heads side by side, and both (what the waits model of
#             fastnmf/profile/static/schedule_waits.py predicts: 1.9-2.2x -> 1.1-1.5x)
#   check3    bench/check_design3.py: design 3's forward and gradient against the reference at
#             2x32x128^3 (untiled, one program, tiled; BraTS and [None, 4]): whether the
#             shared-memory fix of 274807b holds on the GPU (run it first next time)
#   ncu       Nsight Compute on every kernel of one training call (forward + backward,
#             2x32x128^3) of each case of bench/ncu_designs.py (the code's choice for [None, 4]
#             and for [None, 2, 4, 6] and design 3 with [None, 4], fp32, the choices in bf16,
#             then two latency candidates; NCU_CASES
#             picks, NCU_ARGS adds arguments to each run): speed of light, occupancy, warp
#             states, scheduler, memory, source counters (where the warps stall: design 3's
#             spin-waits between programs or its tiles). Each case first runs unprofiled, all
#             at once, so that their kernels compile in parallel. Writes <case>.ncu-rep, its
#             details page and raw metrics (CSV), and summary.md: per kernel the cycles between
#             a warp's instructions and what the warps wait for, what timings cannot say (needs
#             ncu on PATH, or NCU=path; clocks left alone)
#   host      bench/host_overhead.py --cuda at the layer suite's small shapes (2x32x16^3,
#             2x32x32^3; [None, 4], fp32 and bf16): a call's host time, its time back to back,
#             with a synchronisation (as the layer suite times it) and its kernels' GPU time:
#             why the swin layer lost to windowed SDPA there (0.33 / 1.15 ms at 16^3 on the H200
#             against about 0.1 / 0.25 ms of host time measured without a GPU)
#   v3tests   design 3's CUDA tests (tests/test_kernels_v3.py, tests/test_window3_*.py), in 8
#             pytest-xdist processes (a line a test: a call stopped at its limit still says
#             which passed)
#   local     bench/time_designs.py for local windows (shifts [None]): whether design 1, which
#             local windows run by default (untimed), beats designs 2 and 3 there (and with its
#             stats kernels capped at 128 registers, 16 programs an SM with spills, or in chunks
#             of 64 voxels, 16 / 12 fp32 / bf16; uncapped 12 / 8); what deleting design 1 waits for;
#             design 2 with its four tiles asks for each bf16 sector once, design 1 twice
#   isles     bench/time_designs.py for the isles preset's layer (E = P = 4, shifts [None, 1, 2, 3],
#             sub-boxes of one voxel; 2x32x64^3, fp32/bf16): the code's choice (design 3, whose
#             tiles but its ticket tile do not fit windows of 64 voxels: its per-window passes,
#             at the register cap since 2026-12-06, no spill) against designs 1 and 2 (design 2's
#             four tiles spill nothing) and design 3 at 8 warps (no spill): which design that preset
#             should take (bench/results/static_designs/isles_2026-12-06.md; untimed)
#   winop     the window triton ops on the GPU (tests/test_triton_op.py, tests/test_custom_op.py):
#             Inductor compiles a block with each window design's kernels, compiled = eager; and
#             every Triton path of the layer captured in a CUDA graph (tests/test_cuda_graph.py)
#   glue      the fused glue kernels' tests on the GPU, then the swin Factorizer training step
#             (fp32, bf16) with the fused glue (default) and without (FASTNMF_FUSED_GLUE=0):
#             issue 17's deciding measurement
#   check     CUDA variants of the test suite; 10-run bitwise determinism at 2x32x128^3;
#             compute-sanitizer memcheck of one small forward+backward (if the tool is there)
#   nmf       bench_nmf.py for triton, torch and reference (all shapes, fp32 + bf16) and the
#             global path's T sweep, as pytest-benchmark JSON
#   global    the global path's reduction in steps against a chunk in one step (time_global.py:
#             2x32x128^3, fp32/bf16, fwd and fwd+bwd), then its T sweep (triton; T = 1, 5, 20) as
#             pytest-benchmark JSON
#   tune      bench/tune_window.py --quick: per-kernel time split and launch-parameter sweeps, for
#             shifts [None, 4] (the layer target) and [None, 2, 4, 6] (the BraTS preset)
#   compiled  bench_nmf.py for torch.compile(reference) (slow: one compilation per case)
#   layer     fastnmf profile --suite layer, the cases of issue 6's first target only (swin NMF
#             and windowed SDPA, with and without projections; triton / torch / flash)
#   model     fastnmf profile --suite model, training step of swin Factorizer (triton, reference),
#             swin_unetr and nnunet, fp32 and bf16, then the Factorizers with --checkpoint
#   profile   fastnmf profile --suite all (everything; longer than one call on a GPU)
#
# Every step has its own time limit (STEP_LIMIT_<PHASE>, seconds) so that a slow step cannot take
# the whole call; its log, exit status and wall time go to $OUT/<phase>/ and a line to
# $OUT/summary.txt. Each phase folder is packed into $OUT/<phase>.tgz as soon as the phase ends
# (the device tool brings back at most 8 files, also from a call stopped at its limit). Commit
# what matters under bench/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu}"
[ $# -gt 0 ] || { echo "usage: bench/gpu_session.sh PHASE [PHASE ...] (setup, designs, schedule, check3, ncu, host, v3tests, local, isles, winop, glue, check, nmf, global, compiled, tune, layer, model, profile)" >&2; exit 2; }
for phase in "$@"; do
    case "$phase" in
    setup | designs | schedule | check3 | ncu | host | v3tests | local | isles | winop | glue | check | nmf | global | compiled | tune | layer | model | profile) ;;
    *)
        echo "gpu_session.sh: error: unknown phase '$phase' (setup, designs, schedule, check3, ncu, host, v3tests, local, isles, winop, glue, check, nmf, global, compiled, tune, layer, model, profile)" >&2
        exit 2
        ;;
    esac
done
mkdir -p "$OUT"
# the wheels installed by 'setup' (in this call or an earlier one on a still-warm machine)
[ -d "$HOME/site" ] && export PYTHONPATH="$HOME/site${PYTHONPATH:+:$PYTHONPATH}"

step() {  # step PHASE NAME LIMIT CMD...: run CMD with a time limit, log it, record rc and seconds
    local phase=$1 name=$2 limit=$3
    shift 3
    mkdir -p "$OUT/$phase"
    local t0=$SECONDS rc=0
    timeout "$limit" "$@" >"$OUT/$phase/$name.log" 2>&1 || rc=$?
    printf '%-9s %-22s rc=%-3s %4ss\n' "$phase" "$name" "$rc" "$((SECONDS - t0))" | tee -a "$OUT/summary.txt"
}

pack() {
    [ -d "$OUT/$1" ] && tar czf "$OUT/$1.tgz" -C "$OUT" "$1" && rm -rf "${OUT:?}/$1"
}

# the fastest variant of the designs phase (this call's or a warm machine's earlier one), else
# the code's default
DESIGNS_JSON=runs/designs.json
variant() {  # sets PY: python3, or python3 under bench/with_variant.py --best if there is one
    PY=(python3)
    [ -f "$DESIGNS_JSON" ] && PY=(python3 bench/with_variant.py --best "$DESIGNS_JSON" --)
}

for phase in "$@"; do
    case "$phase" in
    setup)
        # shellcheck disable=SC2086
        step setup wheels 120 python3 -m pip install -q --no-index --no-deps --no-compile \
            --no-cache-dir --target "$HOME/site" .whl/*.whl
        case ":${PYTHONPATH:-}:" in *":$HOME/site:"*) ;; *) export PYTHONPATH="$HOME/site${PYTHONPATH:+:$PYTHONPATH}" ;; esac
        step setup project 120 python3 -m pip install -q --no-index --no-deps \
            --no-build-isolation -e .
        step setup info 60 python3 -m fastnmf info
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
            >"$OUT/setup/nvidia-smi.txt" 2>&1
        ;;
    designs)
        # shellcheck disable=SC2086  # DESIGNS_ARGS: words
        step designs time "${STEP_LIMIT_DESIGNS:-420}" python3 bench/time_designs.py \
            --out "$OUT/designs/designs.json" ${DESIGNS_ARGS:-}
        mkdir -p runs && cp "$OUT/designs/designs.json" "$DESIGNS_JSON" 2>/dev/null
        tail -n 60 "$OUT/designs/time.log"
        ;;
    schedule)
        step schedule time "${STEP_LIMIT_SCHEDULE:-150}" python3 bench/time_designs.py \
            --shape 2 64 64 64 64 --repeats 5 \
            --variants "design 3, four tiles" "design 3, four tiles, skewed schedule" \
            "design 3, four tiles, heads side by side" \
            "design 3, four tiles, heads side by side, skewed" --out "$OUT/schedule/schedule.json"
        tail -n 40 "$OUT/schedule/time.log"
        ;;
    check3)
        step check3 run "${STEP_LIMIT_CHECK3:-180}" python3 bench/check_design3.py
        cat "$OUT/check3/run.log"
        ;;
    ncu)
        mkdir -p "$OUT/ncu"
        NCU_BIN=${NCU:-$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | tail -n 1)}
        if [ -z "$NCU_BIN" ]; then
            echo "ncu not found (PATH, /opt/nvidia/nsight-compute): set NCU" | tee "$OUT/ncu/missing.log"
        else
            cases=${NCU_CASES:-$(python3 bench/ncu_designs.py cases)}
            # every case once without ncu, all at once: their kernels compiled into Triton's
            # cache by as many processes, so that each profiled run below only loads them
            # shellcheck disable=SC2086  # the cases and NCU_ARGS: words
            for c in $cases; do
                timeout "${STEP_LIMIT_NCU_WARM:-240}" python3 bench/ncu_designs.py run --case "$c" \
                    ${NCU_ARGS:-} >"$OUT/ncu/$c.warm.log" 2>&1 &
            done
            wait
            # shellcheck disable=SC2086
            for c in $cases; do
                step ncu "$c" "${STEP_LIMIT_NCU:-150}" "$NCU_BIN" --clock-control none \
                    --profile-from-start off --section SpeedOfLight --section Occupancy \
                    --section LaunchStats --section WarpStateStats --section SchedulerStats \
                    --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables \
                    --section SourceCounters \
                    -f -o "$OUT/ncu/$c" python3 bench/ncu_designs.py run --case "$c" ${NCU_ARGS:-}
                "$NCU_BIN" -i "$OUT/ncu/$c.ncu-rep" --page details >"$OUT/ncu/$c.details.txt" 2>&1
                "$NCU_BIN" -i "$OUT/ncu/$c.ncu-rep" --page raw --csv >"$OUT/ncu/$c.raw.csv" 2>&1
            done
            step ncu summary 60 python3 bench/ncu_designs.py summarize "$OUT/ncu" \
                --out "$OUT/ncu/summary.md"
            cat "$OUT/ncu/summary.md"
        fi
        ;;
    host)
        step host small "${STEP_LIMIT_HOST:-120}" python3 bench/host_overhead.py --cuda \
            --shifts "[None, 4]" --shapes 2x32x16^3 2x32x32^3 --dtype fp32 bf16 --calls 20 \
            --repeats 5 --out "$OUT/host/host_cuda.json"
        cat "$OUT/host/small.log"
        ;;
    v3tests)
        step v3tests tests "${STEP_LIMIT_V3TESTS:-300}" python3 -m pytest -v -n 8 \
            -p no:cacheprovider -rs -k cuda tests/test_kernels_v3.py tests/test_window3_tile.py \
            tests/test_window3_bwd_tile.py tests/test_window3_out_tile.py \
            tests/test_window3_bwd_parts_tile.py
        tail -n 15 "$OUT/v3tests/tests.log"
        ;;
    local)
        step local time "${STEP_LIMIT_LOCAL:-200}" python3 bench/time_designs.py --variants \
            "design 1" "design 1, stats at 128 registers" "design 1, chunks of 64" "design 2" \
            "design 2, 16 warps, 64 registers" "design 2, four tiles" "design 3" "design 3, untiled" \
            "design 3, 8 warps, 2 programs/SM" \
            reference --shifts "[None]" --compile-budget 90 --out "$OUT/local/designs_local.json"
        tail -n 25 "$OUT/local/time.log"
        ;;
    isles)
        step isles time "${STEP_LIMIT_ISLES:-200}" python3 bench/time_designs.py --head-dim 4 \
            --window 4 --shifts "[None, 1, 2, 3]" --shape 2 32 64 64 64 --variants \
            "design 1" "default" "design 2" "design 2, four tiles" \
            "design 3, 8 warps, 2 programs/SM" reference --compile-budget 90 \
            --out "$OUT/isles/designs_isles.json"
        tail -n 25 "$OUT/isles/time.log"
        ;;
    winop)
        step winop tests "${STEP_LIMIT_WINOP:-240}" python3 -m pytest -v -p no:cacheprovider -rs \
            tests/test_triton_op.py tests/test_custom_op.py tests/test_cuda_graph.py
        tail -n 15 "$OUT/winop/tests.log"
        ;;
    glue)
        step glue tests "${STEP_LIMIT_GLUE:-150}" python3 -m pytest -q -p no:cacheprovider -rs \
            tests/test_fused_mlp.py tests/test_proj_glue.py tests/test_pair_proj.py
        step glue step-fused "${STEP_LIMIT_GLUE:-150}" python3 -m fastnmf profile --suite model \
            --tasks train --dtypes fp32 bf16 --kernels triton --models swin_factorizer nnunet \
            --out "$OUT/glue/fused"
        FASTNMF_FUSED_GLUE=0 step glue step-lean "${STEP_LIMIT_GLUE:-150}" python3 -m fastnmf \
            profile --suite model --tasks train --dtypes fp32 bf16 --kernels triton \
            --models swin_factorizer --out "$OUT/glue/lean"
        ;;
    check)
        step check cuda-tests "${STEP_LIMIT_CHECK:-300}" python3 -m pytest tests -q -k cuda \
            -p no:cacheprovider -rs
        variant
        step check determinism 120 "${PY[@]}" bench/check_determinism.py --runs 10 \
            --dtypes fp32 bf16 fp16 --out "$OUT/check/determinism.json"
        if command -v compute-sanitizer >/dev/null; then
            step check memcheck 240 compute-sanitizer --tool memcheck --error-exitcode 1 \
                python3 bench/check_determinism.py --runs 2 --batch 1 --channels 16 --size 16 \
                --dtypes fp32
        else
            echo "compute-sanitizer not on PATH" >"$OUT/check/memcheck.log"
        fi
        ;;
    nmf)
        for k in triton torch reference; do
            step nmf "bench-$k" "${STEP_LIMIT_NMF:-180}" python3 -m pytest bench/bench_nmf.py \
                --benchmark-only -q -p no:cacheprovider -k "test_nmf_layer and k_$k" \
                --benchmark-json "$OUT/nmf/bench_nmf_$k.json"
        done
        step nmf global-iters 120 python3 -m pytest bench/bench_nmf.py --benchmark-only -q \
            -p no:cacheprovider -k global_iters --benchmark-json "$OUT/nmf/global_iters.json"
        step nmf summary 60 python3 bench/summarize_nmf.py "$OUT"/nmf/*.json \
            --json "$OUT/nmf/summary.json" --md "$OUT/nmf/summary.md"
        ;;
    global)
        step global steps "${STEP_LIMIT_GLOBAL_STEPS:-240}" python3 bench/time_global.py \
            --out "$OUT/global/global_steps.json"
        cat "$OUT/global/steps.log"
        step global iters "${STEP_LIMIT_GLOBAL:-120}" python3 -m pytest bench/bench_nmf.py \
            --benchmark-only -q -p no:cacheprovider -k "global_iters and triton" \
            --benchmark-json "$OUT/global/global_iters.json"
        tail -n 30 "$OUT/global/iters.log"
        ;;
    compiled)
        step compiled bench "${STEP_LIMIT_COMPILED:-540}" python3 -m pytest bench/bench_nmf.py \
            --benchmark-only -q -p no:cacheprovider -k "compiled and 2x32x128" \
            --benchmark-json "$OUT/compiled/bench_nmf_compiled.json"
        ;;
    tune)
        step tune window-s4 "${STEP_LIMIT_TUNE:-240}" python3 bench/tune_window.py --quick \
            --shifts 4 --out "$OUT/tune/tune_window_s4.json"
        step tune window-s246 "${STEP_LIMIT_TUNE:-240}" python3 bench/tune_window.py --quick \
            --shifts 2 4 6 --out "$OUT/tune/tune_window_s246.json"
        ;;
    layer)
        variant
        mixers=${LAYER_MIXERS:-nmf-swin sdpa-window nmf-swin-layer sdpa-window-layer}
        impls=${LAYER_IMPLS:-triton torch flash}
        # shellcheck disable=SC2086  # the mixers and impls: words
        step layer swin-vs-sdpa "${STEP_LIMIT_LAYER:-400}" "${PY[@]}" -m fastnmf profile \
            --suite layer --mixers $mixers --impls $impls --repeats 5 --out "$OUT/layer/report"
        tail -n 40 "$OUT/layer/swin-vs-sdpa.log"
        ;;
    model)
        step model train "${STEP_LIMIT_MODEL:-300}" python3 -m fastnmf profile --suite model \
            --tasks train --dtypes fp32 bf16 --kernels triton reference \
            --models swin_factorizer swin_unetr nnunet --out "$OUT/model/report"
        step model train-ckpt "${STEP_LIMIT_MODEL:-200}" python3 -m fastnmf profile --suite model \
            --tasks train --dtypes fp32 bf16 --kernels triton reference --checkpoint \
            --models swin_factorizer --out "$OUT/model/report-ckpt"
        ;;
    profile)
        step profile all "${STEP_LIMIT_PROFILE:-540}" python3 -m fastnmf profile --suite all \
            --out "$OUT/profile/report"
        ;;
    esac
    pack "$phase"
done
