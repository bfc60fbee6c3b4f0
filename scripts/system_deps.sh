#!/usr/bin/env bash
# The system packages the test suite needs besides Python: a PostgreSQL server (initdb, pg_ctl) for the
# shared-catalog tests, which start a throwaway cluster of their own. Sourced by scripts/test.sh.
# Idempotent and instant when present; installs with apt-get where it is missing and we are root (CI,
# a fresh container); otherwise says what to run. The S3 server (moto) comes with .venv.
have_pg() {
    command -v pg_ctl >/dev/null 2>&1 || compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" >/dev/null
}
if ! have_pg; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "mintd: installing the PostgreSQL server (apt-get install postgresql) for the catalog tests" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >/dev/null
        apt-get install -y -qq --no-install-recommends postgresql >/dev/null
    else
        echo "mintd: no PostgreSQL server found; the PostgreSQL tests will fail until you run" \
            "'sudo apt-get install -y postgresql' (or your system's equivalent)" >&2
    fi
fi
