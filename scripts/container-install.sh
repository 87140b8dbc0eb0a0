#!/bin/sh
# Install smtpproxy into a virtualenv exactly as the container image does.
#
#   usage: scripts/container-install.sh VENV [SOURCE]
#
# VENV is created with "${PYTHON:-python3} -m venv" unless it already exists;
# SOURCE is the project checkout (default: this script's parent directory).
#
# The Dockerfile runs this script, and tests/test_install.py runs it into a
# fresh virtualenv and then starts the installed twistd: no Docker engine is
# needed to prove that the image's install steps produce a working relay.
#
# Steps:
#  1. build the wheel from a clean copy of the sources, so the checkout gets
#     no build/ or *.egg-info, and nothing generated there (a stale
#     dropin.cache, __pycache__) can reach the wheel;
#  2. install the wheel and its dependencies from the package index;
#  3. write Twisted's plugin cache (dropin.cache) into the installed
#     twisted/plugins directory and check that it lists smtpproxy.  The image
#     runs as a user who cannot write there, so a cache missing or older than
#     the plugin files would be rebuilt in memory on every start and logged
#     as an error.
set -eu

log() {
    printf 'container-install: %s\n' "$*" >&2
}

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
    echo "usage: $0 VENV [SOURCE]" >&2
    exit 2
fi
venv=$1
source_dir=$(cd "${2:-$(dirname "$0")/..}" && pwd)
python=${PYTHON:-python3}

if [ ! -x "$venv/bin/python" ]; then
    log "creating virtualenv $venv"
    "$python" -m venv "$venv"
fi
venv=$(cd "$venv" && pwd)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
trap 'exit 130' INT TERM

pip() {
    "$venv/bin/python" -m pip --disable-pip-version-check --no-input --quiet "$@"
}

log "building the wheel from $source_dir"
mkdir "$work/source"
cp -R "$source_dir/pyproject.toml" "$source_dir/README.md" "$source_dir/src" "$work/source/"
find "$work/source" \( -name __pycache__ -o -name '*.egg-info' -o -name dropin.cache \) \
    -prune -exec rm -rf {} +
pip wheel --no-deps --wheel-dir "$work/wheels" "$work/source"

log "installing into $venv"
set -- "$work"/wheels/smtpproxy-*.whl
if [ $# -ne 1 ] || [ ! -f "$1" ]; then
    log "expected exactly one smtpproxy wheel, found: $*"
    exit 1
fi
pip install "$1"

log "writing the twisted plugin cache"
# -I: ignore PYTHONPATH, the user's site-packages and the current directory,
# so the cache is built from what is installed in the venv and nothing else.
"$venv/bin/python" -I - <<'EOF'
import sys
import time
from pathlib import Path

import twisted.plugins
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins

plugin_dir = Path(twisted.plugins.__file__).parent
if not (plugin_dir / "smtpproxy_plugin.py").is_file():
    sys.exit(f"container-install: {plugin_dir}/smtpproxy_plugin.py is missing from the install")

# Twisted rebuilds the cache when a plugin file is not older than it.  Image
# layers may keep whole seconds only, so write the cache in a later second
# than every plugin file (waits at most a second or two).
newest = max(path.stat().st_mtime for path in plugin_dir.glob("*.py"))
time.sleep(min(2.0, max(0.0, int(newest) + 1 - time.time())))

names = sorted(plugin.tapname for plugin in getPlugins(IServiceMaker))
if "smtpproxy" not in names:
    sys.exit(f"container-install: twistd plugins found: {names}; smtpproxy is not among them")
cache = plugin_dir / "dropin.cache"
if not cache.is_file() or int(cache.stat().st_mtime) <= int(newest):
    sys.exit(f"container-install: {cache} was not written; is {plugin_dir} writable?")
print(f"container-install: plugin cache {cache} lists smtpproxy", file=sys.stderr)
EOF
