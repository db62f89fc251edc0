#!/bin/sh
# Installs everything scanbox needs on Debian 12 (run as root): the system packages, then a
# virtualenv in .venv with scanbox and its test tools, and .venv/wheelhouse with the wheels of
# scanbox's runtime dependencies. Safe to run again; it only adds what is missing, and a second
# run with nothing changed needs no network.
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
# libgnutls30: wine's Schannel (the DLLs' https:// to the box) loads it at run time; libwine only
# recommends it, and recommends are not installed here.
PACKAGES="$PACKAGES libgnutls30"
# mono-mcs + three class libraries: examples/ScanboxClient.cs is built (C# 5) and run against a
# box over TLS (tests/api/test_csharp_example.py); mono-mcs brings the runtime (its TLS is
# BoringSSL) and the core libraries: 8 MB to download, 27 MB installed, about 30 s to install.
PACKAGES="$PACKAGES mono-mcs libmono-system-net-http4.0-cil libmono-system-runtime-serialization4.0-cil"
PACKAGES="$PACKAGES libmono-system-xml-linq4.0-cil"

missing=""
# one dpkg-query for all (a package dpkg has never heard of is simply not listed)
installed=$(dpkg-query -W -f='${Package} ${Status}\n' $PACKAGES 2>/dev/null || true)
for p in $PACKAGES; do
    echo "$installed" | grep -qx "$p install ok installed" || missing="$missing $p"
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

# The Python side is redone only when pyproject.toml or this script changed since the last run
# that finished (the stamp), so a second run needs no network.
stamp=$(cat pyproject.toml bootstrap.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat .venv/bootstrap.stamp 2>/dev/null || true)" = "$stamp" ] && [ -d .venv/wheelhouse ]; then
    exit 0
fi
PIP=".venv/bin/python -m pip --disable-pip-version-check"
$PIP install -q -e '.[test]'
# The wheelhouse: scanbox's runtime dependencies and its build backend as wheels, at the versions
# just installed (pyscard and evdev are built from source once, here). The fresh-virtualenv test
# (tests/appliance/test_wheel.py) builds the wheel and installs it from there alone, with no index.
.venv/bin/python - > .venv/wheelhouse.txt <<'EOF'
import tomllib
with open("pyproject.toml", "rb") as fh:
    project = tomllib.load(fh)
print("\n".join(project["project"]["dependencies"] + project["build-system"]["requires"]))
EOF
$PIP freeze --exclude-editable > .venv/wheelhouse-constraints.txt
rm -rf .venv/wheelhouse
$PIP wheel -q -w .venv/wheelhouse -c .venv/wheelhouse-constraints.txt -r .venv/wheelhouse.txt
echo "$stamp" > .venv/bootstrap.stamp.new
mv .venv/bootstrap.stamp.new .venv/bootstrap.stamp
