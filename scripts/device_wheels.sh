#!/usr/bin/env bash
# Wheels for running the course on a GPU machine whose image has Python 3.12, torch, transformers, accelerate,
# matplotlib and jinja2 but not bitsandbytes, jupyter or papermill, and an older transformers (the workplace's
# device machines): the same versions as this checkout's .venv, for CPython 3.12 on manylinux x86_64, written to
# .whl/ (git-ignored).
# bitsandbytes ships a library per CUDA, ROCm and XPU version (43 MB): only its CPU and CUDA 13.0 ones are kept.
#
#   scripts/device_wheels.sh            # then, on the GPU machine:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES="papermill entrypoints tenacity nbclient nbformat fastjsonschema jsonschema jsonschema-specifications
referencing rpds-py jupyter_client jupyter_core platformdirs traitlets pyzmq tornado ipykernel comm debugpy
nest-asyncio2 ipython ipython-pygments-lexers jedi parso matplotlib-inline pexpect ptyprocess prompt_toolkit wcwidth
stack_data asttokens executing pure_eval nbconvert beautifulsoup4 soupsieve bleach webencodings tinycss2 defusedxml
jupyterlab_pygments mistune pandocfilters ipywidgets jupyterlab_widgets widgetsnbextension filelock bitsandbytes
transformers huggingface_hub tokenizers safetensors accelerate hf-xet httpx2 httpcore2 h11 truststore anyio typer
annotated-doc shellingham"
pins=()
for name in $PACKAGES; do
  version=$(.venv/bin/python -m pip show "$name" 2>/dev/null | awk '/^Version/{print $2}')
  [ -n "$version" ] || { echo "$name is not installed in .venv: run make setup first" >&2; exit 1; }
  pins+=("$name==$version")
done
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  --platform any -d .whl "${pins[@]}"
# Keep only the CPU and CUDA 13.0 libraries inside the bitsandbytes wheel (a wheel is a zip: repack it).
wheel=$(ls .whl/bitsandbytes-*.whl)
work=$(mktemp -d)
(cd "$work" && unzip -q "$OLDPWD/$wheel" && find . -name 'libbitsandbytes_*.so' ! -name 'libbitsandbytes_cuda130.so' ! -name 'libbitsandbytes_cpu.so' -delete \
  && rm "$OLDPWD/$wheel" && zip -q -r "$OLDPWD/$wheel" .)
rm -rf "$work"
du -sh .whl
