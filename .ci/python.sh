#!/usr/bin/env bash
# Usage: .ci/python.sh 3.13
# Prints the path of a CPython of that minor version, building it once per machine from
# Debian's source package (the upstream .orig.tar.xz, checked by apt against the signed
# archive) into a cache outside the clone, so later CI runs on the machine reuse it.
#   ISOLATOR_PYTHON_CACHE  where builds live (default /var/cache/isolator if writable,
#                          else ~/.cache/isolator)
# Everything but the final path goes to stderr.
set -euo pipefail

minor=${1:?usage: $0 3.13}
case $minor in
    # trixie is Debian's stable release; forky (testing) carries the newer minors.
    3.13) suite=trixie ;;
    3.14 | 3.15) suite=forky ;;
    *) echo "python.sh: no Debian suite known for $minor" >&2; exit 2 ;;
esac

if [ -z "${ISOLATOR_PYTHON_CACHE:-}" ]; then
    if mkdir -p /var/cache/isolator 2>/dev/null && [ -w /var/cache/isolator ]; then
        ISOLATOR_PYTHON_CACHE=/var/cache/isolator
    else
        ISOLATOR_PYTHON_CACHE=$HOME/.cache/isolator
    fi
fi
cache=$ISOLATOR_PYTHON_CACHE
prefix=$cache/python$minor
python=$prefix/bin/python$minor
mkdir -p "$cache"

# A build counts once its marker is written after a complete install, so a killed build is
# never mistaken for a finished one.
usable() { [ -e "$prefix/.complete" ] && [ -x "$python" ]; }

if usable; then
    echo "$python"
    exit 0
fi

# Two CI runs on one machine must not build into the same place at once.
exec 9>"$cache/python$minor.lock"
flock 9
if usable; then
    echo "$python"
    exit 0
fi

start=$SECONDS
echo "python.sh: building CPython $minor from Debian's $suite source into $prefix" >&2

# The modules pip, venv, coverage and the tests need: ssl (PyPI), zlib (wheels), sqlite3
# (coverage data), ctypes (libffi), plus the usual compression and readline.
build_deps=(build-essential pkg-config libssl-dev zlib1g-dev libffi-dev libsqlite3-dev
    libbz2-dev liblzma-dev libreadline-dev uuid-dev xz-utils)
missing=()
for dep in "${build_deps[@]}"; do
    dpkg-query -W -f '${Status}' "$dep" 2>/dev/null | grep -q 'ok installed' || missing+=("$dep")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "python.sh: installing build dependencies: ${missing[*]}" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
fi

# A private source list, so the machine's own apt configuration is left as it was.
apt_dir=$cache/apt
mkdir -p "$apt_dir/lists/partial"
cat >"$apt_dir/debian-src.sources" <<EOF
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: trixie forky
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
# Downloads land in a directory of ours, which apt's unprivileged _apt user cannot write.
apt_opts=(-o "Dir::Etc::SourceList=$apt_dir/debian-src.sources" -o "Dir::Etc::SourceParts=/dev/null"
    -o "APT::Sandbox::User=root"
    -o "Dir::State::Lists=$apt_dir/lists")
apt-get "${apt_opts[@]}" -qq update >&2

work=$cache/build-$minor
rm -rf "$work" "$prefix"
mkdir -p "$work"
(cd "$work" && apt-get "${apt_opts[@]}" -qq source --download-only "python$minor/$suite" >&2)
orig=$(ls "$work"/python"$minor"_*.orig.tar.xz)
tar -C "$work" -xJf "$orig"
src=$(find "$work" -mindepth 1 -maxdepth 1 -type d -name 'Python-*')
echo "python.sh: $(basename "$orig")" >&2

# Test modules are left out (neither built nor installed): they are half the install time and
# nothing here uses them. pip comes later from venv's own bundled wheel.
(
    cd "$src"
    ./configure -q --prefix="$prefix" --disable-test-modules --without-ensurepip >&2
    make -s -j"$(nproc)" >&2
    make -s install >&2
) >"$work/build.log" 2>&1 || {
    tail -40 "$work/build.log" >&2
    exit 1
}
# configure leaves out a module whose library is missing without failing; pip, venv, coverage
# and the tests need these.
if ! "$python" -c 'import ssl, zlib, sqlite3, ctypes, bz2, lzma' 2>/dev/null; then
    echo "python.sh: $python lacks a module it needs (ssl, zlib, sqlite3, ctypes, bz2, lzma)" >&2
    tail -40 "$work/build.log" >&2
    exit 1
fi
touch "$prefix/.complete"
rm -rf "$work"
echo "python.sh: built $("$python" -V) in $((SECONDS - start))s" >&2
echo "$python"
