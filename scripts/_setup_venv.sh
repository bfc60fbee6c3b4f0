# Sourced by scripts/test.sh and scripts/demo.sh: make .venv ready, activate it, cd to the repo root.
# A fresh machine has nothing installed, so this builds the venv on first use (a few minutes) and
# reinstalls only when pyproject.toml or the presence of an NVIDIA GPU changes.

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if command -v nvidia-smi >/dev/null 2>&1; then
    torch_req="torch"          # let pip pick a CUDA-capable build
else
    torch_req="torch==2.13.0"  # the CPU build; installed first so the package does not pull a CUDA one
fi
want="$(cat pyproject.toml scripts/_setup_venv.sh | sha256sum | cut -d' ' -f1) $torch_req"
stamp=".venv/.mintd-installed"

if [ ! -x .venv/bin/python ]; then
    echo "mintd: creating .venv (first run takes a few minutes)" >&2
    python3 -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate

if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "mintd: installing $torch_req and mintd[dev,demo,postgres,s3] into .venv" >&2
    python -m pip install -q "$torch_req"
    python -m pip install -q -e '.[dev,demo,postgres,s3]'
    printf '%s\n' "$want" > "$stamp"
fi

export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
