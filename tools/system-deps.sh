#!/usr/bin/env bash
# Installs the system packages poodle needs where it can: ffmpeg (with ffprobe) for decoding,
# DejaVu Sans for the text of `poodle-train plot`, Python 3 with its venv module (make setup's
# .venv: ONNX Runtime, zarr-python, tensorboard), and Open MPI with libclang (the `mpi`
# feature's bindings) for data-parallel CPU training and its tests, and a C++ compiler (the
# host emulation of the CUDA kernels); through apt-get as root, or through passwordless sudo,
# on Debian/Ubuntu. Elsewhere it stops with the packages to install.
set -euo pipefail
FONT=/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf
packages=()
{ command -v ffmpeg >/dev/null && command -v ffprobe >/dev/null; } || packages+=(ffmpeg)
[ -e "$FONT" ] || [ -n "${POODLE_PLOT_FONT:-}" ] || packages+=(fonts-dejavu-core)
command -v mpirun >/dev/null && command -v mpicc >/dev/null || packages+=(openmpi-bin libopenmpi-dev)
ldconfig -p 2>/dev/null | grep -Eq 'libclang(-[0-9]+)?\.so ' || packages+=(libclang-dev)
# The test cuda_kernels_emulated compiles the CUDA kernels' text for the host.
command -v "${CXX:-c++}" >/dev/null || packages+=(g++)
has_venv() { python3 -c 'import venv, ensurepip' 2>/dev/null; }
has_venv || packages+=(python3 python3-venv)
[ ${#packages[@]} -eq 0 ] && exit 0
echo "system-deps: installing the Debian packages ${packages[*]}" >&2
if command -v apt-get >/dev/null; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then
    if sudo -n true 2>/dev/null; then SUDO="sudo"; else
      echo "system-deps: not root and no passwordless sudo; run: sudo apt-get install -y ${packages[*]}" >&2
      exit 1
    fi
  fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${packages[@]}" >/dev/null
  command -v ffmpeg >/dev/null && command -v ffprobe >/dev/null \
    && { [ -e "$FONT" ] || [ -n "${POODLE_PLOT_FONT:-}" ]; } \
    && command -v mpirun >/dev/null && command -v "${CXX:-c++}" >/dev/null && has_venv && exit 0
fi
echo "system-deps: install ${packages[*]} with your system's package manager (ffmpeg with" \
  "ffprobe; any TrueType font for plots, named by POODLE_PLOT_FONT; Open MPI and libclang" \
  "for the mpi feature; a C++ compiler), e.g." \
  "'sudo dnf install ffmpeg dejavu-sans-fonts' or 'brew install ffmpeg'" >&2
exit 1
