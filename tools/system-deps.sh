#!/usr/bin/env bash
# Installs the system packages poodle needs (ffmpeg and ffprobe) where it can: through apt-get as
# root, or through passwordless sudo, on Debian/Ubuntu. Elsewhere it stops with the command to run.
set -euo pipefail
missing=()
for tool in ffmpeg ffprobe; do command -v "$tool" >/dev/null || missing+=("$tool"); done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "system-deps: ${missing[*]} missing; installing the Debian package ffmpeg" >&2
if command -v apt-get >/dev/null; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then
    if sudo -n true 2>/dev/null; then SUDO="sudo"; else
      echo "system-deps: not root and no passwordless sudo; run: sudo apt-get install -y ffmpeg" >&2
      exit 1
    fi
  fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq ffmpeg >/dev/null
  command -v ffmpeg >/dev/null && command -v ffprobe >/dev/null && exit 0
fi
echo "system-deps: install ffmpeg (with ffprobe) with your system's package manager," \
  "e.g. 'sudo apt-get install -y ffmpeg', 'sudo dnf install ffmpeg' or 'brew install ffmpeg'" >&2
exit 1
