#!/usr/bin/env bash
# Packs what this workplace's GPU machines lack to run benchmarks/gpu_check.py: nnU-Net and the packages it needs
# that their image (Python 3.12 with torch, no network) does not hold, plus hatchling to install this checkout
# there, as the unpacked wheels in one xz tarball. A device call carries 64 MiB with the repository; SimpleITK's
# wheel alone is 53 MB as a wheel, 29 MB in xz. Run here, where pip reaches an index:
#
#   benchmarks/gpu_pack.sh [OUT_FOLDER, default .gpu]        (minutes: xz on one core)
#
# then on the device, in one call that carries the folder (e.g. carry [".gpu"]):
#
#   bash benchmarks/gpu_install.sh .gpu && python3 benchmarks/gpu_check.py --workdir /tmp/gpu_check ...
#
# Versions are those the tests here run with (nnunetv2 2.8.1's resolution); PY sets the target Python (3.12).
set -euo pipefail
out=$(realpath -m "${1:-.gpu}")
py=${PY:-3.12}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
wheels=(nnunetv2==2.8.1 batchgenerators==0.25.5 batchgeneratorsv2==0.3.6 blosc2==4.15.0 ndindex==1.10.1
        dynamic-network-architectures==0.4.4 graphviz==0.21 nibabel==5.4.2 SimpleITK==2.5.7 yacs==0.1.8
        connected-components-3d==4.1.1 future==1.0.0 unittest2==1.1.0 linecache2==1.0.0 traceback2==1.4.0
        pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
        hatchling==1.27.0 trove-classifiers pathspec pluggy)  # the last four: to install this checkout there
platforms=()
for platform in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
                manylinux1_x86_64; do
    platforms+=(--platform "$platform")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
    "${platforms[@]}" -d "$work/wheels" "${wheels[@]}"
python3 -m pip wheel -q --no-deps -w "$work/wheels" acvl-utils==0.2.6  # published as source only; pure Python
mkdir "$work/site"
for wheel in "$work"/wheels/*.whl; do
    unzip -q "$wheel" -d "$work/site/$(basename "$wheel" .whl)"  # the folder keeps the wheel's name
done
mkdir -p "$out"
tar -C "$work/site" -cf - . | xz -6 -T0 > "$out/site.tar.xz"
echo "$out/site.tar.xz: $(du -h "$out/site.tar.xz" | cut -f1), $(ls "$work/site" | wc -l) packages"
