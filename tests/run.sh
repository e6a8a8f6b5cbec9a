#!/usr/bin/env bash
# The test suite, as the README runs it (CI too: .ci/run calls this script): tests/run.sh [pytest arguments]
#
# First the Debian packages the tests use, installed where missing when this runs as root with apt-get:
#   nginx                       the HTTP front of `maskrcnn-serving serve` (the images install it too)
#   chromium, chromium-driver   the web page's browser tests (tests/server/test_web_page.py)
#   buildah, debootstrap        building and running both images (tests/images/, build_tools/build_local.sh)
# Where one cannot be installed, this says which, and the tests that need it skip, each saying why.
# Then pytest, with the venv the README's first command made (.venv).
set -euo pipefail
cd "$(dirname "$0")/.."

[[ -x .venv/bin/python ]] || { echo "error: no .venv: run the README's install command first" >&2; exit 2; }

installed() { command -v "$1" > /dev/null || [[ -x "/usr/sbin/$1" ]]; }

missing=()
installed nginx || missing+=(nginx)
installed chromium || missing+=(chromium)
installed chromedriver || missing+=(chromium-driver)
installed buildah || missing+=(buildah)
installed debootstrap || missing+=(debootstrap)
if [[ ${#missing[@]} -gt 0 && "$(id -u)" == 0 ]] && command -v apt-get > /dev/null; then
    echo "installing ${missing[*]} (apt-get)" >&2
    apt-get update -qq || echo "apt-get update failed; trying the package lists there are" >&2
    for package in "${missing[@]}"; do
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$package" > /dev/null \
            || echo "could not install $package" >&2
    done
    still=()
    for package in "${missing[@]}"; do
        command="${package/chromium-driver/chromedriver}"
        installed "$command" || still+=("$package")
    done
    missing=(${still[@]+"${still[@]}"})
fi
if [[ ${#missing[@]} -gt 0 ]]; then
    echo "not installed: ${missing[*]} (as root: apt-get install ${missing[*]}); the tests that need them skip" >&2
fi

exec .venv/bin/python -m pytest -q "$@"
