#!/usr/bin/env bash
# Installs the system libraries that MuJoCo's offscreen EGL renderer needs (Mesa llvmpipe on a CPU),
# only when they are missing. Idempotent; needs root (or sudo) the first time on a bare machine.
set -euo pipefail
need=()
for lib in libEGL.so.1 libGL.so.1 libOpenGL.so.0; do
  ldconfig -p 2>/dev/null | grep -q "$lib" || need+=("$lib")
done
ls /usr/lib/*/dri/swrast_dri.so >/dev/null 2>&1 || ls /usr/lib/*/dri/*_dri.so >/dev/null 2>&1 || need+=(dri)
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
echo "installing EGL/Mesa system libraries (missing: ${need[*]})"
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libegl1 libgl1 libopengl0 libgl1-mesa-dri libegl-mesa0 libglx-mesa0 >/dev/null
