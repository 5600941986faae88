#!/usr/bin/env bash
# Debian packages the workspace needs to build and test: the verbs transport links rdma-core
# (libibverbs, librdmacm) and generates its bindings with libclang (bindgen); the Python
# client's tests run in a virtual environment (python3-venv). Idempotent: does
# nothing when they are installed. Run as root (or with sudo) on a fresh Debian machine.
set -euo pipefail
pkgs=(libibverbs-dev librdmacm-dev libclang-dev clang pkg-config python3 python3-venv)
if dpkg -s "${pkgs[@]}" >/dev/null 2>&1; then
  exit 0
fi
sudo=""
if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -q
$sudo apt-get install -y -q --no-install-recommends "${pkgs[@]}"
