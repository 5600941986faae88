#!/bin/sh
# Starts two sidecars and the example's agents; prints "result: OK" when every check passed.
exec "${PYTHON:-python3}" "$(dirname "$0")/run.py" "$@"
