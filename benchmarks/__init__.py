"""treadfx benchmarks (run from the repository root).

    python -m benchmarks                    # the TREAD suite on the default device (and DiffMoE if present)
    python -m benchmarks.step --model tiny  # dense vs hand-written TREAD vs treadfx training steps
    python -m benchmarks.route_ops          # route ops (select + gather + scatter) vs one block
    bash benchmarks/run_gpu.sh --quick      # the GPU targets in under 8 minutes (benchmarks.gpu_quick)

Shared measuring code lives in :mod:`benchmarks.timing` (step timing, spread,
peak memory, dynamo counters, environment) and :mod:`benchmarks.profiling`
(where a step's time goes); model presets in :mod:`benchmarks.workloads`; the
hand-written TREAD reference in :mod:`benchmarks.reference_tread`.  Results and
targets: ``benchmarks/RESULTS.md``; GPU commands: ``benchmarks/run_gpu.sh``.
"""
