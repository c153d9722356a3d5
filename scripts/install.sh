#!/usr/bin/env bash
# Install the pinned stack into a virtual environment: TensorFlow first, then Horovod built from
# source against it (Gloo controller, TensorFlow ops), then this project in editable mode.
# Used by `make install` and by docker/Dockerfile, so both run exactly these steps.
#   VENV=.venv PYTHON=python3.11 scripts/install.sh
# EDITABLE=0 installs the project as a regular package (for `make package`, whose archive cannot
# hold an editable install).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3.11}
EDITABLE=${EDITABLE:-1}
# GPU images set TF_PACKAGE='tensorflow[and-cuda]' and HOROVOD_GPU_OPERATIONS=NCCL (docker/Dockerfile.gpu).
TF_PACKAGE=${TF_PACKAGE:-tensorflow-cpu}

die() { echo "install: $*" >&2; exit 1; }

command -v "$PYTHON" >/dev/null 2>&1 \
  || die "$PYTHON not found. cxr-spark needs Python 3.11 (TensorFlow 2.15 has no 3.12 wheels); set PYTHON=/path/to/python3.11"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
  || die "$PYTHON is $("$PYTHON" -V 2>&1); cxr-spark needs Python 3.11 (TensorFlow 2.15 has no 3.12 wheels)"
command -v java >/dev/null 2>&1 || die "java not found. Spark 3.5 needs Java 17 (install openjdk-17-jre-headless or set JAVA_HOME)"
java_major=$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n1)
[ "$java_major" = "17" ] || die "java is version ${java_major:-unknown}; cxr-spark is tested with Java 17 (Spark 3.5 supports 8/11/17)"

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade "pip>=23" wheel "setuptools>=68,<70"

echo "install: TensorFlow and the pinned stack"
"${PIP[@]}" install -q -c constraints.txt "$TF_PACKAGE==2.15.1" numpy pyarrow pyspark pandas petastorm \
  opencv-python-headless pillow pydicom matplotlib scikit-learn mlflow pytest venv-pack

if "$VENV/bin/python" -c 'import horovod.tensorflow, horovod.spark' 2>/dev/null; then
  echo "install: Horovod already built"
else
  echo "install: building Horovod 0.28.1 from source with TensorFlow and Gloo (3-7 minutes the first time; pip caches the wheel)"
  HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 HOROVOD_WITHOUT_PYTORCH=1 \
  HOROVOD_WITHOUT_MXNET=1 MAKEFLAGS="-j$(nproc)" \
    "${PIP[@]}" install -q --no-build-isolation -c constraints.txt "horovod[spark]==0.28.1"
fi
check=$("$VENV/bin/horovodrun" --check-build 2>&1) || die "horovodrun --check-build failed: $check"
grep -q '\[X\] TensorFlow' <<<"$check" || die "Horovod was built without TensorFlow support:\n$check"
grep -q '\[X\] Gloo' <<<"$check" || die "Horovod was built without Gloo:\n$check"

if [ "$EDITABLE" = 1 ]; then
  "${PIP[@]}" install -q --no-deps -e .
else
  "${PIP[@]}" install -q --no-deps --force-reinstall .
fi
if [ "$EDITABLE" = 1 ]; then  # not in `make package`'s environment archive: clusters start their JVMs themselves
  echo "install: Spark's classes archived for the local driver JVM (cxr_spark/io/jvm_archive.py; once, about a minute)"
  "$VENV/bin/python" -m cxr_spark.make_jvm_archive
fi
"$VENV/bin/python" - <<'PY'
import numpy, pyarrow, pyspark, tensorflow, petastorm, horovod
print(f"install: ok: numpy {numpy.__version__}, pyarrow {pyarrow.__version__}, pyspark {pyspark.__version__}, "
      f"tensorflow {tensorflow.__version__}, petastorm {petastorm.__version__}, horovod {horovod.__version__}")
PY
