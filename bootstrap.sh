#!/bin/sh
# Installs everything scanbox needs on Debian 12 (run as root): the system packages, then a
# virtualenv in .venv with scanbox and its test tools. Safe to run again; it only adds what is
# missing.
set -eu
cd "$(dirname "$0")"

# gcc + python3-dev: evdev builds from source. python3-venv: the virtualenv itself.
# fonts-wqy-zenhei: the Chinese font the OLED screens use (bitmaps drawn for 12 and 16 px).
PACKAGES="python3 python3-venv python3-dev gcc fonts-wqy-zenhei chromium chromium-driver"

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
