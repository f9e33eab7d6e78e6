#!/usr/bin/env bash
# Build (once) and install Horovod 0.28.1 into the project's virtual environment.
#
# Horovod 0.28.1, the last release, ships as an sdist whose CMake files force C++14, while the
# headers of PyTorch 2.x need C++17. We build it with a compiler wrapper that upgrades the standard
# flag, against the torch and the MPI already in the venv, and cache the wheel so that later setups
# install it in seconds.
#
#   tools/build_horovod.sh [VENV]        (default VENV: .venv)
#
# Environment: HPCGRAFT_WHEEL_CACHE (default ~/.cache/hpcgraft/wheels) holds the built wheel;
# HOROVOD_GPU_OPERATIONS=NCCL etc. pass through for a GPU cluster build (see docs/cluster.md).
set -euo pipefail
venv=$(cd "${1:-.venv}" && pwd)
version=0.28.1
cache=${HPCGRAFT_WHEEL_CACHE:-$HOME/.cache/hpcgraft/wheels}
torch_version=$("$venv/bin/python" -c 'import torch; print(torch.__version__.replace("+", "_"))')
wheel_dir="$cache/horovod-$version-torch-$torch_version"

if "$venv/bin/python" -c 'import horovod.torch' 2>/dev/null; then
    echo "horovod: already installed in $venv"
    exit 0
fi

if ! ls "$wheel_dir"/horovod-*.whl >/dev/null 2>&1; then
    echo "horovod: building $version against torch $torch_version (about 6 minutes on 2 cores, once)"
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    cat >"$work/cxx17" <<'WRAP'
#!/usr/bin/env bash
args=()
for a in "$@"; do
    case "$a" in
        -std=c++11|-std=c++14|-std=gnu++11|-std=gnu++14) args+=("-std=c++17") ;;
        *) args+=("$a") ;;
    esac
done
exec g++ "${args[@]}"
WRAP
    chmod +x "$work/cxx17"
    # CMake 4 refuses the old cmake_minimum_required of Horovod's third-party code; 3.x works.
    if ! command -v cmake >/dev/null 2>&1; then "$venv/bin/pip" install -q "cmake>=3.13,<4"; fi
    mkdir -p "$wheel_dir"
    PATH="$venv/bin:$PATH" CXX="$work/cxx17" CC=gcc \
    HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
    HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1 CMAKE_POLICY_VERSION_MINIMUM=3.5 MAKEFLAGS="-j$(nproc)" \
        "$venv/bin/pip" wheel --no-deps --no-build-isolation -w "$work/out" "horovod==$version"
    mv "$work"/out/horovod-*.whl "$wheel_dir"/
fi
"$venv/bin/pip" install -q --no-deps "$wheel_dir"/horovod-*.whl
"$venv/bin/pip" install -q cloudpickle psutil packaging pyyaml cffi
"$venv/bin/python" -c 'import horovod, horovod.torch as hvd; print("horovod:", horovod.__version__, "mpi built:", hvd.mpi_built(), "gloo built:", hvd.gloo_built())'
