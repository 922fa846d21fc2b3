#!/usr/bin/env bash
# Decode-kernel A/B on the GPU machine, no vLLM needed (docs/gpu-runs.md): `main`'s sources, exported beforehand
# and carried (`carry: [".gpu-carry/exp/main"]`),
#   rm -rf .gpu-carry/exp/main && mkdir -p .gpu-carry/exp/main &&
#   git archive main vllm_gds_plugin kernels | tar -x -C .gpu-carry/exp/main
# against the working tree (a kernel branch checked out): its compiled kernel tests, both kernels alternated twice,
# both trees' per-kernel profile of a decode layer, its launch-shape sweep (`--sweep`); then main's verify
# variants (benchmarks/verify_overhead.py) with what is left of BUDGET seconds.
# Usage: BUDGET=500 bash scripts/gpu/ab_decode.sh
BUDGET=${BUDGET:-500}
bash scripts/gpu/plugin_copy.sh . /tmp/pp
bash scripts/gpu/plugin_copy.sh .gpu-carry/exp/main /tmp/pm
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
T0=$(date +%s); elapsed() { echo $(( $(date +%s) - T0 )); }; left() { echo $(( BUDGET - $(elapsed) )); }
# pytest from /tmp: in the repository root its vllm_gds_plugin/ (no kernels/) would shadow /tmp/pp.
(cd /tmp && PYTHONPATH=/tmp/pp timeout 300 python3 -m pytest -q -x -p no:cacheprovider $OLDPWD/tests/test_tq_kernels.py $OLDPWD/tests/test_tq_edge_values.py -k 'attention or dequant or special or store' 2>&1 | tail -3)
echo "t=$(elapsed)"
mkdir -p $OUT/main $OUT/new $OUT/tiles $OUT/verify
B="python3 -P benchmarks/bench_tq_attention.py"
tree() { if [ $1 = main ]; then echo /tmp/pm; else echo /tmp/pp; fi; }  # the plugin copy of main / the branch
ab() {
  for v in main new; do
    OUT=$OUT/$v PYTHONPATH=$(tree $v) timeout 50 $B --kernels ours_turboquant ours_3bit ours_4bit --batches 1 8 32 --contexts 4096 32768 2>&1 | grep -v "^ *$" | tail -20 | sed "s/^/$v$1 /"
  done
}
ab 1
# What follows runs only while BUDGET allows it (a short lease gets the tests and one A/B round).
for v in main new; do  # GPU time per kernel of one decode layer (store + attention), both trees
  [ $(left) -gt 60 ] && OUT=$OUT/$v PYTHONPATH=$(tree $v) timeout 25 $B --profile 2>&1 | tail -10 | sed "s/^/profile-$v /"
done
# The working tree's launch shapes and split counts (bench_tq_attention --sweep: 146 s on an H100 on 2026-12-07);
# it goes before the second A/B round and the verify tail, which a shorter lease can do without.
[ $(left) -gt 180 ] && OUT=$OUT/tiles PYTHONPATH=/tmp/pp timeout $(( $(left) - 20 )) $B --sweep 2>&1 | grep -v "^ *$" | tail -40
[ $(left) -gt 100 ] && ab 2
echo "t=$(elapsed)"
[ $(left) -gt 200 ] && PYTHONPATH=/tmp/pm timeout $(( $(left) - 20 )) python3 -P benchmarks/verify_overhead.py --dir /tmp/lb --reps 4 --out $OUT/verify 2>&1 | tail -16
echo "t=$(elapsed)"
