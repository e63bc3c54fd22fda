#!/usr/bin/env bash
# On a GPU machine of this workplace (its python3 holds torch; nothing can be fetched): installs the packages that
# benchmarks/gpu_pack.sh packed, then this checkout, into that python3 (a regular install: an editable one needs
# one more package, and the checkout does not change during the call).
#
#   bash benchmarks/gpu_install.sh PACK_FOLDER        (default .gpu)
set -euo pipefail
pack=$(realpath "${1:-.gpu}")
[ -f "$pack/site.tar.xz" ] || { echo "gpu_install: no $pack/site.tar.xz: run benchmarks/gpu_pack.sh where pip reaches an index, and carry its folder" >&2; exit 2; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir "$work/site" "$work/wheels"
xz -dc "$pack/site.tar.xz" | tar -C "$work/site" -xf -
python3 - "$work/site" "$work/wheels" <<'PYTHON'
import sys
import zipfile
from pathlib import Path

site, wheels = Path(sys.argv[1]), Path(sys.argv[2])
for folder in sorted(p for p in site.iterdir() if p.is_dir()):  # each folder an unpacked wheel, named as it
    with zipfile.ZipFile(wheels / f"{folder.name}.whl", "w", zipfile.ZIP_STORED) as wheel:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                wheel.write(path, path.relative_to(folder).as_posix())
PYTHON
python3 -m pip install -q --no-index --no-deps --no-compile "$work"/wheels/*.whl
python3 -m pip install -q --no-index --no-deps --no-build-isolation "$(dirname "$0")/.."
python3 -c "import nnunetv2, nnunet_contrast, torch; print('gpu_install: nnunet-contrast', nnunet_contrast.__version__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
