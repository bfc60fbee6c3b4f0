#!/usr/bin/env bash
# Build the client SDK environments the end-to-end tests drive mintd with: bash scripts/sdk_envs.sh
#
#   .venv-sdk/tinker-0.22   tinker==0.22.0
#   .venv-sdk/tinker-0.38   tinker==0.38.0
#   .venv-sdk/mint-0.2      mindlab-toolkit==0.2.0 (`import mint`; pins tinker 0.22.0)
#
# Each SDK gets its own venv so its pinned dependencies (pydantic, httpx, protobuf...) are the ones
# it was released against, not ours. torch is only needed client-side by forward_backward_custom and
# is ~700 MB, so instead of installing it three more times each SDK venv gets a `.pth` file naming
# the main .venv's site-packages: a .pth line is *appended* to sys.path, so the SDK venv's own
# packages win and the main venv is only a fallback (torch and whatever torch imports).
#
# Needs .venv (scripts/_setup_venv.sh builds it). Idempotent: a stamp per venv skips pip when
# nothing changed, so a warm run takes well under a second.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

main_py=".venv/bin/python"
if [ ! -x "$main_py" ]; then
    echo "sdk_envs.sh: .venv is missing; run scripts/test.sh (or source scripts/_setup_venv.sh) first" >&2
    exit 1
fi
main_site="$("$main_py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
py_version="$("$main_py" -c 'import sys; print(sys.version.split()[0])')"
recipe=1  # bump when build() below changes in a way that needs existing venvs rebuilt

declare -A reqs=(
    [tinker-0.22]="tinker==0.22.0"
    [tinker-0.38]="tinker==0.38.0"
    [mint-0.2]="mindlab-toolkit==0.2.0"
)
declare -A checks=(
    [tinker-0.22]="0.22.0"
    [tinker-0.38]="0.38.0"
    [mint-0.2]="0.22.0 mint"
)

# Runs in the SDK venv: the pinned tinker version is the installed one, and tinker, torch (through
# the fallback) and numpy import. Extra module names after the version are imported too.
check_src='
import importlib, importlib.metadata as md, sys
want, mods = sys.argv[1], sys.argv[2:]
got = md.version("tinker")
assert got == want, f"tinker {got} installed, want {want}"
for name in ["tinker", "torch", "numpy", *mods]:
    importlib.import_module(name)
'

stamp_of() { printf '%s %s %s' "$recipe" "$py_version" "${reqs[$1]}"; }

build() {  # build NAME: a fresh venv with its SDK installed, stamped
    local dir=".venv-sdk/$1"
    rm -rf "$dir"
    "$main_py" -m venv "$dir"
    # The fallback .pth is written only after pip is done: seeing the main venv's packages, pip would
    # count them as installed instead of giving the SDK its own. pipefail makes a pip failure fail the
    # build; grep drops the harmless "Location ... is ignored" warnings of this machine's pip config.
    "$dir/bin/python" -m pip install -q --no-compile "${reqs[$1]}" 2>&1 \
        | { grep -v "^WARNING: Location '.*' is ignored" || true; }
    stamp_of "$1" > "$dir/.mintd-sdk-installed"
}

mkdir -p .venv-sdk
names=(tinker-0.22 tinker-0.38 mint-0.2)
stale=()
for name in "${names[@]}"; do
    if [ ! -x ".venv-sdk/$name/bin/python" ] \
        || [ "$(cat ".venv-sdk/$name/.mintd-sdk-installed" 2>/dev/null)" != "$(stamp_of "$name")" ]; then
        stale+=("$name")
    fi
done

if [ "${#stale[@]}" -gt 0 ]; then
    echo "mintd: building SDK venvs under .venv-sdk/: ${stale[*]} (first run takes a minute or two)" >&2
    # In parallel: each is mostly download and unpack time.
    pids=()
    for name in "${stale[@]}"; do
        build "$name" > ".venv-sdk/$name.log" 2>&1 &
        pids+=($!)
    done
    failed=0
    for i in "${!pids[@]}"; do
        if ! wait "${pids[$i]}"; then
            echo "sdk_envs.sh: building .venv-sdk/${stale[$i]} failed:" >&2
            cat ".venv-sdk/${stale[$i]}.log" >&2
            failed=1
        fi
    done
    [ "$failed" -eq 0 ] || exit 1
fi

for name in "${names[@]}"; do
    dir=".venv-sdk/$name"
    site="$("$dir/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    # Rewritten every run (cheap): the checkout, and so the main venv, may have moved.
    printf '%s\n' "$main_site" > "$site/zz_mintd_fallback.pth"
    if [ "${#stale[@]}" -gt 0 ]; then
        # shellcheck disable=SC2086
        if ! "$dir/bin/python" -c "$check_src" ${checks[$name]}; then
            echo "sdk_envs.sh: .venv-sdk/$name does not import what the tests need" >&2
            rm -f "$dir/.mintd-sdk-installed"
            exit 1
        fi
    fi
done
