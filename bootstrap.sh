#!/bin/sh
# Installs everything scanbox needs on Debian 12 (run as root): the system packages, then a
# virtualenv in .venv with scanbox and its test tools. Safe to run again; it only adds what is
# missing.
set -eu
cd "$(dirname "$0")"

# gcc + python3-dev: evdev builds from source. python3-venv: the virtualenv itself.
# fonts-wqy-zenhei: the Chinese font the OLED screens use (bitmaps drawn for 12 and 16 px).
# systemd: systemd-analyze, which checks the units (tests/appliance/test_systemd.py);
# shellcheck: the image's scripts (tests/appliance/test_image.py).
# libzbar0: the zbar QR decoder behind pyzbar (decoder = "zbar" in a camera source).
PACKAGES="python3 python3-venv python3-dev gcc fonts-wqy-zenhei libzbar0 systemd shellcheck"
# pcscd + libpcsclite-dev + swig: card readers through PC/SC (pyscard builds against them);
# vsmartcard-vpcd: the virtual reader the card tests put their emulated cards in.
PACKAGES="$PACKAGES pcscd libpcsclite-dev swig vsmartcard-vpcd"
# chromium + chromium-driver: the web HIS example is tested in a real headless browser.
PACKAGES="$PACKAGES chromium chromium-driver"
# curl: the demo banner's HTTP example.
PACKAGES="$PACKAGES curl"
# prometheus: a real Prometheus scrapes a running box (tests/fleet), and its promtool checks and
# unit-tests the alert rules in contrib/prometheus.
PACKAGES="$PACKAGES prometheus"
# mingw-w64 (both architectures) + make: windows/'s WSCallDLL.dll and OneTrans2.dll are built
# by the tests; wine64 runs the 64-bit build against a box (tests/windows).
PACKAGES="$PACKAGES gcc-mingw-w64-i686 gcc-mingw-w64-x86-64 make wine64"

missing=""
for p in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "bootstrap: need root to install:$missing" >&2
        exit 1
    fi
    echo "bootstrap: installing system packages:$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends $missing
fi

# Debian's own Python 3.11: the same interpreter the appliance image uses.
PYTHON=${PYTHON:-/usr/bin/python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
