#!/usr/bin/env bash
# Gradescope runs this once, as root, when it builds the autograder image (Ubuntu), from
# /autograder/source.  The Python environment goes outside /autograder/source: run_autograder makes
# that folder unreadable to learner code, which must still be able to run Python.
set -euo pipefail
SRC="$(cd "$(dirname "$0")" && pwd)"
VENV="${COURSE_VENV:-/opt/course-venv}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq python3 python3-venv python3-pip >/dev/null
# bubblewrap is the strongest sandbox; where the container cannot make namespaces the grader falls
# back to running learner code as the unprivileged user `nobody`.
apt-get install -y -qq bubblewrap >/dev/null || echo "no bubblewrap: learner code will run as nobody"
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# The same torch pin as the course's Makefile (TORCH_SPEC); the index is the one given to
# `course export gradescope --torch-index` (a CPU-only build keeps the image small), else pip's default.
"$VENV/bin/python" -m pip install --quiet "@TORCH_SPEC@" @TORCH_INDEX_ARGS@
"$VENV/bin/python" -m pip install --quiet -r "$SRC/requirements.txt"
