"""Conversion between the engine's flat adapter tensors and Hugging Face PEFT's LoRA format.

The engine names a target the way PEFT names the adapted module (`model.layers.0.self_attn.q_proj`) or,
for fused MoE experts, module path + parameter (`model.layers.0.mlp.experts.gate_up_proj`), and holds
`<target>.lora_A` [r, in] / `<target>.lora_B` [out, r] (experts: [E, r, in] / [E, out, r]). The scale
is alpha / rank in both, so an exported folder loads into `PeftModel.from_pretrained` with equal outputs.

PEFT 0.21 adapts a fused-expert parameter with a `ParamWrapper` whose A and B are plain linears holding
every expert: lora_A.weight [E*r, in] is A reshaped, lora_B.weight [out, r*E] is B with the expert index
last (`get_delta_weight` reads them back as A.reshape(E, r, in) and B.reshape(out, r, E)). Two adapted
parameters of one module nest: the wrapper of the parameter registered first (`gate_up_proj`) sits
innermost, so its keys carry one `base_layer.` per wrapper around it.
"""

from __future__ import annotations

import io
import json
import tarfile
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from mintd.families import LINEAR_KINDS, adapted_names
from mintd.lora_config import LoraSpec

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
README_FILE = "README.md"
SPEC_METADATA = "mintd.target_modules"  # safetensors metadata: the exported adapter's target_modules
# Parameters of transformers' fused experts modules, in registration order (= PEFT nesting, inner first).
FUSED_PARAMS = ("gate_up_proj", "down_proj")
_SUFFIXES = {"lora_A": ".lora_A.weight", "lora_B": ".lora_B.weight"}
# adapter_config.json options whose effect the engine does not reproduce: refuse rather than load wrongly.
_UNSUPPORTED = (
    "use_dora",
    "use_rslora",
    "modules_to_save",
    "lora_bias",
    "fan_in_fan_out",
    "rank_pattern",
    "alpha_pattern",
    "layers_to_transform",
    "layer_replication",
    "trainable_token_indices",
    "alora_invocation_tokens",
    "use_qalora",
    "use_bdlora",
    "megatron_config",
    "velora_config",
    "kasa_config",
    "monteclora_config",
    "arrow_config",
)


def is_expert_target(name: str) -> bool:
    """A fused-expert parameter (`...experts.down_proj`), not a linear module (`...mlp.down_proj`)."""
    module, _, leaf = name.rpartition(".")
    return leaf in FUSED_PARAMS and module.rpartition(".")[2] == "experts"


def _layer_relative(name: str) -> str:
    """`model.layers.3.mlp.experts.down_proj` -> `mlp.experts.down_proj`: one entry matches every layer."""
    parts = name.split(".")
    digits = [i for i, p in enumerate(parts) if p.isdigit()]
    return ".".join(parts[digits[-1] + 1 :]) if digits else name


def adapted(tensors: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """{switch: names} the adapter's tensors adapt, as provenance records it (targets already checked)."""
    targets = {k.rpartition(".")[0] for k in tensors}
    return adapted_names(
        (t, "mlp" if is_expert_target(t) else LINEAR_KINDS[t.rpartition(".")[2]], is_expert_target(t))
        for t in targets
    )


def peft_unloadable(model_type: str | None, target_names: list[str]) -> list[str]:
    """Targets PEFT cannot apply for `model_type` (empty: the export loads into PEFT exactly).

    PEFT (>= 0.18) on transformers 5 rewrites `gate_proj` / `up_proj` / `down_proj` in `target_modules` of
    the MoE model types whose v4 checkpoints had per-expert linears (DeepSeek-V3, Qwen3-MoE, Qwen3-Next,
    GLM-4-MoE, ...) into the fused expert parameters, for v4 compatibility. Dense MLPs and shared experts
    of those models therefore cannot be named: PEFT refuses such a folder (a rank mismatch), it never
    applies it wrongly."""
    if not model_type:
        return []
    try:  # PEFT's own table of the rewrite; a PEFT without it does not rewrite
        from peft.utils.transformers_weight_conversion import (
            _MODEL_TO_CONVERSION_PATTERN,
            _MOE_TARGET_MODULE_MAPPING,
        )
    except ImportError:
        return []
    renamed = _MOE_TARGET_MODULE_MAPPING.get(_MODEL_TO_CONVERSION_PATTERN.get(model_type, ""), {})
    return [n for n in target_names if not is_expert_target(n) and n.rpartition(".")[2] in renamed]


def peft_config(spec: LoraSpec, target_names: list[str]) -> LoraConfig:
    """The LoraConfig PEFT needs to rebuild these targets, with the same rank and scale."""
    linear = sorted({n.rpartition(".")[2] for n in target_names if not is_expert_target(n)})
    params = sorted({_layer_relative(n) for n in target_names if is_expert_target(n)})
    alpha = int(spec.alpha) if float(spec.alpha).is_integer() else spec.alpha
    return LoraConfig(
        r=spec.rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        bias="none",
        # never None: PEFT would then fill in its own default targets for the model type
        target_modules=linear,
        target_parameters=params or None,
        task_type="CAUSAL_LM",
    )


def _split_key(key: str) -> tuple[str, str]:
    """`<target>.lora_A` -> (target, "lora_A")."""
    target, _, kind = key.rpartition(".")
    if kind not in _SUFFIXES or not target:
        raise ValueError(f"adapter tensors: {key} is not a LoRA tensor (<target>.lora_A / .lora_B)")
    return target, kind


def nesting_depths(expert_targets: list[str]) -> dict[str, int]:
    """How many ParamWrappers PEFT puts around each expert parameter's own wrapper (see module doc)."""
    by_module: dict[str, list[str]] = {}
    for name in expert_targets:
        module, _, leaf = name.rpartition(".")
        by_module.setdefault(module, []).append(leaf)
    depths = {}
    for module, leaves in by_module.items():
        ordered = [p for p in FUSED_PARAMS if p in leaves]
        for i, leaf in enumerate(ordered):
            depths[f"{module}.{leaf}"] = len(ordered) - 1 - i
    return depths


def to_peft_state_dict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Engine tensors -> the state dict PEFT saves (`set_peft_model_state_dict` loads it as is)."""
    split = {key: _split_key(key) for key in tensors}
    experts = sorted({t for t, _ in split.values() if is_expert_target(t)})
    depths = nesting_depths(experts)
    out = {}
    for key, t in tensors.items():
        target, kind = split[key]
        t = t.detach()
        if target in depths:
            if t.dim() != 3:
                raise ValueError(f"adapter tensors: {key} must be 3-D [experts, ...], got {tuple(t.shape)}")
            module = target.rpartition(".")[0] + ".base_layer" * depths[target]
            # A [E, r, in] -> [E*r, in];  B [E, out, r] -> [out, r, E] -> [out, r*E]
            t = t.reshape(-1, t.shape[-1]) if kind == "lora_A" else t.permute(1, 2, 0).reshape(t.shape[1], -1)
        else:
            if t.dim() != 2:
                raise ValueError(f"adapter tensors: {key} must be 2-D, got {tuple(t.shape)}")
            module = target
        out[PREFIX + module + _SUFFIXES[kind]] = t.contiguous()
    return out


def _expert_param(module: str, depth: int, target_parameters: list[str]) -> str | None:
    """The parameter a key at `module` + `depth` x `.base_layer` adapts, or None for a linear module."""
    leaves = set()
    for entry in target_parameters:
        owner, _, leaf = entry.rpartition(".")
        if owner and (module == owner or module.endswith("." + owner)):
            leaves.add(leaf)
    if not leaves:
        return None
    unknown = leaves - set(FUSED_PARAMS)
    if unknown:
        raise ValueError(f"adapter config: unsupported target parameter {sorted(unknown)[0]!r}")
    ordered = [p for p in FUSED_PARAMS if p in leaves]
    if depth >= len(ordered):
        raise ValueError(
            f"adapter weights: {module} is nested {depth} deep but targets {len(ordered)} params"
        )
    return f"{module}.{ordered[len(ordered) - 1 - depth]}"


def from_peft_state_dict(
    state: dict[str, torch.Tensor], rank: int, target_parameters: list[str] | None = None
) -> dict[str, torch.Tensor]:
    """PEFT state dict -> engine tensors. `rank` and `target_parameters` come from the LoraConfig: the
    rank splits the experts' [E*r, ...] blocks, the parameters tell expert wrappers from linear modules.

    `*.base_layer.weight` entries (PEFT saves the base lm_head when it is targeted) restate base-model
    weights, not the adapter, and are skipped."""
    out = {}
    for key, t in state.items():
        if key.endswith(".base_layer.weight") and ".lora_" not in key:
            continue
        kind = next((k for k, suffix in _SUFFIXES.items() if key.endswith(suffix)), None)
        if kind is None or not key.startswith(PREFIX):
            raise ValueError(f"adapter weights: unexpected key {key}")
        path = key[len(PREFIX) : -len(_SUFFIXES[kind])]
        depth = 0
        while path.endswith(".base_layer"):
            path, depth = path[: -len(".base_layer")], depth + 1
        target = _expert_param(path, depth, target_parameters or [])
        if target is None:
            if depth or t.dim() != 2:
                raise ValueError(f"adapter weights: {key} is not a LoRA linear weight")
            expected = t.shape[0] if kind == "lora_A" else t.shape[1]
            if expected != rank:
                raise ValueError(f"adapter weights: {key} has shape {tuple(t.shape)}, not rank {rank}")
            out[f"{path}.{kind}"] = t
            continue
        size = t.shape[0] if kind == "lora_A" else t.shape[1]
        if t.dim() != 2 or size % rank:
            raise ValueError(f"adapter weights: {key} has shape {tuple(t.shape)}, not [E*{rank}, ...]")
        experts = size // rank
        if kind == "lora_A":
            out[f"{target}.{kind}"] = t.reshape(experts, rank, t.shape[1])
        else:
            out[f"{target}.{kind}"] = t.reshape(t.shape[0], rank, experts).permute(2, 0, 1).contiguous()
    for target in {k.rpartition(".")[0] for k in out}:
        for kind in _SUFFIXES:
            if f"{target}.{kind}" not in out:
                raise ValueError(f"adapter weights: {target} has no {kind}")
    return out


def export_readme(tensors: dict[str, torch.Tensor], base_model_name: str, model_type: str | None) -> str:
    """README.md of an export: what the adapter adapts, and what PEFT can and cannot load of it."""
    targets = sorted({_split_key(k)[0] for k in tensors})
    lines = [
        f"# LoRA adapter for {base_model_name or 'its base model'}",
        "",
        "Exported by mintd. Adapted:",
        "",
    ]
    lines += [f"- {kind}: {', '.join(names)}" for kind, names in adapted(tensors).items()]
    if any(is_expert_target(t) for t in targets):
        lines += [
            "",
            "Routed experts are fused 3-D tensors, listed in `target_parameters` (PEFT >= 0.17 loads them; "
            "engines that only read `target_modules`, such as vLLM, do not apply the expert deltas).",
        ]
    blocked = peft_unloadable(model_type, targets)
    if blocked:
        leaves = sorted({t.rpartition(".")[2] for t in blocked})
        lines += [
            "",
            f"**PEFT cannot load this adapter.** For model type `{model_type}`, PEFT on transformers 5 "
            f"rewrites {', '.join(f'`{x}`' for x in leaves)} in `target_modules` into the fused experts (its "
            "compatibility with older checkpoints), so the dense-MLP / shared-expert LoRA here "
            f"({len(blocked)} modules) cannot be expressed; PEFT refuses the folder with a shape mismatch. "
            "The weights are exact: import the folder into mintd, or export an adapter trained with "
            "train_mlp=false.",
        ]
    return "\n".join(lines) + "\n"


def save_peft_folder(
    directory: Path | str,
    spec: LoraSpec,
    tensors: dict[str, torch.Tensor],
    base_model_name: str,
    model_type: str | None = None,
) -> None:
    """Write adapter_config.json + adapter_model.safetensors, loadable by `PeftModel.from_pretrained`
    (except where README.md, also written, says PEFT cannot express a layer of `model_type`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = peft_config(spec, sorted({_split_key(k)[0] for k in tensors}))
    config.base_model_name_or_path = base_model_name
    config.save_pretrained(str(directory))
    # PEFT ignores safetensors metadata; mintd's import reads back the exact target set from it. One key
    # only (no "format"): safetensors writes metadata in hash order, and an export must be deterministic.
    metadata = {SPEC_METADATA: json.dumps(list(spec.target_modules) if spec.target_modules else None)}
    save_file(to_peft_state_dict(tensors), str(directory / WEIGHTS_FILE), metadata=metadata)
    (directory / README_FILE).write_text(export_readme(tensors, base_model_name, model_type))


def peft_files(
    spec: LoraSpec, tensors: dict[str, torch.Tensor], base_model_name: str, model_type: str | None = None
) -> dict[str, bytes]:
    """The files of a PEFT folder as bytes (what a download hands out), written by `save_peft_folder`."""
    with tempfile.TemporaryDirectory(prefix="mintd-peft-") as tmp:
        save_peft_folder(tmp, spec, tensors, base_model_name, model_type)
        return {path.name: path.read_bytes() for path in sorted(Path(tmp).iterdir())}


def tar_gz(files: dict[str, bytes]) -> bytes:
    """A .tar.gz holding `files` at its root (the Tinker checkpoint archive layout)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz", compresslevel=1) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def untar_peft(data: bytes, directory: Path | str, max_bytes: int = 8 << 30) -> None:
    """Unpack a PEFT folder archive (.tar or .tar.gz, files at its root or in one top folder) into
    `directory`. Only the two PEFT files are taken, as regular files: no links, no paths outside."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
            for name, member in _peft_members(tar, max_bytes).items():
                (Path(directory) / name).write_bytes(tar.extractfile(member).read())
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ValueError(f"archive: not a readable tar or tar.gz file ({e})") from None


def _peft_members(tar: tarfile.TarFile, max_bytes: int) -> dict[str, tarfile.TarInfo]:
    found: dict[str, tarfile.TarInfo] = {}
    for member in tar.getmembers():
        parts = [p for p in member.name.split("/") if p not in ("", ".")]
        if ".." in parts or member.name.startswith("/") or len(parts) > 2:
            raise ValueError(f"archive: unexpected member {member.name!r} (a PEFT folder is flat)")
        if parts and parts[-1] in (CONFIG_FILE, WEIGHTS_FILE):
            if not member.isfile():
                raise ValueError(f"archive: {member.name!r} must be a regular file")
            if parts[-1] in found:
                raise ValueError(f"archive: {parts[-1]} appears twice")
            found[parts[-1]] = member
    if sum(m.size for m in found.values()) > max_bytes:
        raise ValueError(f"archive: larger than {max_bytes} bytes unpacked")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if name not in found:
            raise ValueError(f"archive: no {name} (expected a PEFT adapter folder)")
    return found


def _read_config(directory: Path) -> dict:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{directory}: not a PEFT adapter folder (no {CONFIG_FILE})")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: must hold a JSON object")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type {config.get('peft_type')!r} is not supported (only LORA)")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"{path}: r must be a positive integer, got {r!r}")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or alpha <= 0:
        raise ValueError(f"{path}: lora_alpha must be a positive number, got {alpha!r}")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{path}: bias={config['bias']!r} is not supported (only 'none')")
    for option in _UNSUPPORTED:
        if config.get(option):
            raise ValueError(f"{path}: {option}={config[option]!r} is not supported")
    for option in ("target_modules", "target_parameters"):
        value = config.get(option)
        if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise ValueError(f"{path}: {option} must be a list of names (regex strings are not supported)")
    return config


def _exported_target_modules(weights: Path, leaves: set[str]) -> tuple[str, ...] | None:
    """`target_modules` of the spec: what mintd's own export recorded (None: every linear module of the
    enabled switches, whatever the family names them), else the linear modules the file holds."""
    with safe_open(str(weights), "pt") as f:
        recorded = (f.metadata() or {}).get(SPEC_METADATA)
    if recorded is not None:
        try:
            modules = json.loads(recorded)
        except json.JSONDecodeError:
            raise ValueError(f"{weights}: metadata {SPEC_METADATA} is not JSON") from None
        if modules is None or (isinstance(modules, list) and set(modules) == leaves):
            return None if modules is None else tuple(modules)
        raise ValueError(f"{weights}: metadata {SPEC_METADATA} disagrees with the weights")
    return tuple(sorted(leaves)) if leaves else None


def load_peft_folder(directory: Path | str) -> tuple[LoraSpec, dict[str, torch.Tensor]]:
    """Read a PEFT LoRA folder back into (spec, engine tensors), refusing what the engine cannot apply
    exactly; the engine's `load_adapter` then checks the targets against its base model."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"{directory}: no such adapter folder")
    config = _read_config(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise ValueError(f"{directory}: no {WEIGHTS_FILE} (only safetensors adapters are supported)")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{weights}: unreadable safetensors file ({e})") from None
    tensors = from_peft_state_dict(state, config["r"], config.get("target_parameters"))
    if not tensors:
        raise ValueError(f"{weights}: holds no LoRA weights")
    modules = config.get("target_modules") or []
    leaves = set()
    for target in {k.rpartition(".")[0] for k in tensors}:
        leaf = target.rpartition(".")[2]
        if is_expert_target(target):
            continue
        if leaf not in LINEAR_KINDS:
            raise ValueError(f"{weights}: unsupported target module {target}")
        if not any(target == m or target.endswith("." + m) for m in modules):
            raise ValueError(f"{weights}: {target} is not among target_modules {modules}")
        leaves.add(leaf)
    kinds = set(adapted(tensors))
    spec = LoraSpec(
        rank=config["r"],
        alpha=float(config["lora_alpha"]),
        train_attn="attn" in kinds,
        train_mlp="mlp" in kinds,
        train_unembed="unembed" in kinds,
        target_modules=_exported_target_modules(weights, leaves),
    )
    return spec, {k: v.to(torch.float32) for k, v in tensors.items()}
