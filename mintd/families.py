"""Which linear maps of a base model LoRA adapts, per model family: an explicit contract, checked at load.

Every weight matrix in the model (a parameter of two or more dimensions) is one of:
- adapted under one of Tinker's switches: `train_attn` (attention and other token mixers: MLA's low-rank
  q/kv projections, linear-attention projections), `train_mlp` (dense MLPs, shared experts, routed
  experts) or `train_unembed` (the output head);
- excluded by a named rule (MoE routers and gates, embeddings, short convolutions), or
- neither: then loading fails with an error naming the weight. Nothing is skipped silently.

A family's contract names module leaves (`q_proj`) and fused-expert parameters (`experts.gate_up_proj`).
Model types without a contract of their own get the default one (Llama-style names), so a model with
projections named differently fails loudly instead of losing them. Biases are never adapted (as PEFT's
`bias="none"`), and one-dimensional parameters (norms, biases, gpt-oss sinks) are not linear maps.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from torch import nn

TargetKind = Literal["attn", "mlp", "unembed"]
KINDS: tuple[TargetKind, ...] = ("attn", "mlp", "unembed")

ROUTER = "MoE router (routing logits, not a representation)"
SHARED_GATE = "MoE shared-expert gate (a scalar gate per token)"
EMBEDDING = "token embedding (Tinker adapts linear layers only)"
CONV = "depthwise short convolution of linear attention (not a dense linear map)"


@dataclass(frozen=True)
class Family:
    """One family's contract. Leaves name nn.Linear modules; `experts` names fused 3-D expert parameters."""

    label: str  # what the README table calls it
    model_types: tuple[str, ...]  # transformers' config.model_type values it covers ("" = the default)
    attn: tuple[str, ...]
    mlp: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    experts: tuple[str, ...] = ()  # `experts.<param>`, adapted under train_mlp, one A/B pair per expert
    unembed: tuple[str, ...] = ("lm_head",)
    excluded: tuple[tuple[str, str], ...] = (("embed_tokens", EMBEDDING),)  # (module leaf, rule)
    # sdpa where the family supports it; gpt-oss's attention sinks need eager (or flex) attention
    attn_implementation: str = "sdpa"
    tiny_arch: str | None = None  # the `mintd make-tiny-model --arch` preset of this layout

    def kind_of(self, leaf: str) -> TargetKind | None:
        for kind in KINDS:
            if leaf in getattr(self, kind):
                return kind
        return None

    def excluded_rule(self, leaf: str) -> str | None:
        return dict(self.excluded).get(leaf)


_FUSED = ("experts.gate_up_proj", "experts.down_proj")
_ROUTED = (("embed_tokens", EMBEDDING), ("gate", ROUTER))

DEFAULT = Family(
    "Llama, Qwen2/2.5/3, Mistral and other dense models", ("",), ("q_proj", "k_proj", "v_proj", "o_proj")
)

FAMILIES: tuple[Family, ...] = (
    Family("Qwen3 (dense)", ("qwen3",), DEFAULT.attn, tiny_arch="qwen3"),
    Family("Llama", ("llama",), DEFAULT.attn, tiny_arch="llama"),
    Family(
        "Qwen3-MoE", ("qwen3_moe",), DEFAULT.attn, experts=_FUSED, excluded=_ROUTED, tiny_arch="qwen3-moe"
    ),
    Family(
        "DeepSeek-V2/V3 (MLA + MoE with shared experts)",
        ("deepseek_v3", "deepseek_v2"),
        # q_proj when q_lora_rank is None; q_a/q_b_proj otherwise. kv_b_proj is applied to the cached
        # latent at every step (no weight absorption), so its LoRA delta is never lost.
        ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"),
        experts=_FUSED,
        excluded=_ROUTED,
        tiny_arch="deepseek-v3",
    ),
    Family(
        "gpt-oss (attention sinks, sliding windows, MoE with biases)",
        ("gpt_oss",),
        DEFAULT.attn,
        mlp=(),
        experts=_FUSED,
        excluded=(("embed_tokens", EMBEDDING), ("router", ROUTER)),
        attn_implementation="eager",
        tiny_arch="gpt-oss",
    ),
    Family(
        "Qwen3-Next (Gated DeltaNet linear attention + full attention, MoE)",
        ("qwen3_next",),
        (*DEFAULT.attn, "in_proj_qkvz", "in_proj_ba", "out_proj"),
        experts=_FUSED,
        excluded=(*_ROUTED, ("shared_expert_gate", SHARED_GATE), ("conv1d", CONV)),
        tiny_arch="qwen3-next",
    ),
    Family(
        "Qwen3.5 (Gated DeltaNet with split projections + full attention)",
        ("qwen3_5_moe", "qwen3_5_text"),
        (*DEFAULT.attn, "in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj"),
        experts=_FUSED,
        excluded=(*_ROUTED, ("shared_expert_gate", SHARED_GATE), ("conv1d", CONV)),
    ),
    Family(
        "Other MoE: Qwen2-MoE, Mixtral, GLM-4-MoE, ERNIE-4.5-MoE",
        ("qwen2_moe", "mixtral", "glm4_moe", "ernie4_5_moe"),
        DEFAULT.attn,
        experts=_FUSED,
        excluded=(*_ROUTED, ("shared_expert_gate", SHARED_GATE)),
    ),
    DEFAULT,
)

# Every leaf name any family adapts, with its switch (a leaf means the same thing in every family):
# what `lora_config.target_modules` may name.
LINEAR_KINDS: dict[str, TargetKind] = {
    leaf: kind for f in FAMILIES for kind in KINDS for leaf in getattr(f, kind) if "." not in leaf
}


def family_for(model_type: str) -> Family:
    return next((f for f in FAMILIES if model_type in f.model_types), DEFAULT)


class UnclassifiedLayerError(ValueError):
    """A weight matrix the family's contract neither adapts nor excludes."""


@dataclass(frozen=True)
class Found:
    """One weight matrix of the model and what the contract says about it."""

    module: str  # module path
    param: str  # parameter name on that module
    kind: TargetKind | None  # None: excluded
    rule: str | None = None  # why it is excluded


def display_name(module: str, param: str) -> str:
    """How reports name a weight: the module leaf (`q_a_proj`), or `experts.<param>` for fused experts."""
    leaf = module.rpartition(".")[2]
    return leaf if param == "weight" else f"{leaf}.{param}"


def adapted_names(targets: Iterable[tuple[str, TargetKind, bool]]) -> dict[str, list[str]]:
    """{switch: display names} for (target name, kind, is fused experts) triples: what an adapter adapts,
    as get_info and revision provenance report it."""
    out: dict[str, set[str]] = {}
    for name, kind, experts in targets:
        module, _, param = name.rpartition(".") if experts else (name, "", "weight")
        out.setdefault(kind, set()).add(display_name(module, param))
    return {kind: sorted(names) for kind, names in sorted(out.items())}


def classify(model: nn.Module, family: Family) -> list[Found]:
    """Every weight matrix of `model` under `family`'s contract; UnclassifiedLayerError names any other."""
    found: list[Found] = []
    unknown: list[str] = []
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for path, module in model.named_modules():
        leaf = path.rpartition(".")[2]
        for pname, p in module.named_parameters(recurse=False):
            if p.dim() < 2 or pname.endswith("bias"):
                continue
            full = f"{path}.{pname}"
            rule = family.excluded_rule(leaf)
            if rule is not None:
                found.append(Found(path, pname, None, rule))
            elif isinstance(module, nn.Linear) and pname == "weight":
                kind = family.kind_of(leaf) or ("unembed" if module is output else None)
                if kind is None:
                    unknown.append(full)
                else:
                    found.append(Found(path, pname, kind))
            elif f"{leaf}.{pname}" in family.experts and p.dim() == 3:
                found.append(Found(path, pname, "mlp"))
            else:
                unknown.append(full)
    if unknown:
        raise UnclassifiedLayerError(
            f"{type(model).__name__} ({family.label} contract): weight {unknown[0]} is neither adapted nor "
            f"excluded by a named rule ({len(unknown)} such weights); mintd does not skip layers silently. "
            "Add it to the family's contract in mintd/families.py"
        )
    return found


def markdown_table() -> str:
    """The README's table of families and what each switch adapts (tests check the README holds it)."""
    lines = [
        "| Family (`model_type`) | `train_attn` | `train_mlp` | `train_unembed` | not adapted (rule) "
        "| tested |",
        "|---|---|---|---|---|---|",
    ]
    for f in FAMILIES:
        types = ", ".join(f"`{t}`" for t in f.model_types if t) or "any other"
        cells = [
            ", ".join(f"`{n}`" for n in getattr(f, k) + (f.experts if k == "mlp" else ())) or "-"
            for k in KINDS
        ]
        rules = "; ".join(f"`{leaf}`: {rule}" for leaf, rule in f.excluded)
        tested = f"end to end (`--arch {f.tiny_arch}`)" if f.tiny_arch else "contract, on a meta-device build"
        lines.append(f"| {f.label} ({types}) | {' | '.join(cells)} | {rules} | {tested} |")
    return "\n".join(lines)
