"""scvi-tools' ``VAE`` parameter names -> censusvi's, for weights copied between the two.

scvi-tools names layers ``fc_layers.Layer {i}.{j}`` (with a literal space): j = 0 the Linear,
j = 1 the BatchNorm. Its batch one-hot columns are the last input columns of every injected layer,
as censusvi's (``InjectedLinear``), so weights copy unchanged. Entries an NB model with an observed
library never uses (``l_encoder``, ``px_r_decoder``, ``px_dropout_decoder``) and newer versions'
``pyro_param_store`` are dropped. Imports torch only.
"""

from __future__ import annotations

import re

import torch

_FC = re.compile(
    r"^(z_encoder\.encoder|l_encoder\.encoder|decoder\.px_decoder)\.fc_layers\.Layer (\d+)\.(\d)\.(.+)$"
)
_PREFIX = {
    "z_encoder.encoder": "z_encoder.fc",
    "l_encoder.encoder": "l_encoder.fc",
    "decoder.px_decoder": "decoder.fc",
}
_RENAMES = {
    "z_encoder.mean_encoder.": "z_encoder.mean.",
    "z_encoder.var_encoder.": "z_encoder.var.",
    "l_encoder.mean_encoder.": "l_encoder.mean.",
    "l_encoder.var_encoder.": "l_encoder.var.",
    "decoder.px_scale_decoder.0.": "decoder.scale.",
    "decoder.px_dropout_decoder.": "decoder.zi_logits.",
}


def censusvi_name(scvi_name: str) -> str | None:
    """The censusvi parameter a scvi-tools one becomes; None for what censusvi does not build."""
    m = _FC.match(scvi_name)
    if m:
        prefix, layer, part, rest = m.groups()
        kind = {"0": "linears", "1": "norms"}.get(part)
        if kind is None:
            raise ValueError(
                f"{scvi_name}: unexpected FC sub-layer {part} (layer norm is not supported)"
            )
        return f"{_PREFIX[prefix]}.{kind}.{layer}." + (
            "linear." + rest if kind == "linears" else rest
        )
    for old, new in _RENAMES.items():
        if scvi_name.startswith(old):
            return new + scvi_name[len(old) :]
    if scvi_name == "px_r":
        return "px_r"
    return None


def state_dict_from_scvi_tools(
    scvi_state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Rename ``scvi_state`` onto the keys of ``expected`` (a censusvi ``VAE.state_dict()``)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in scvi_state.items():
        if not isinstance(tensor, torch.Tensor):
            continue  # e.g. pyro_param_store
        ours = censusvi_name(name)
        if ours is not None and ours in expected:
            out[ours] = tensor
    for name in ("library_log_means", "library_log_vars"):
        if name in scvi_state:
            out[name] = scvi_state[name].reshape(-1)
        elif name in expected:  # the VAE's own starting values
            out[name] = expected[name]
    missing = sorted(set(expected) - set(out))
    if missing:
        raise ValueError(f"the scvi-tools weights lack {missing[:5]}; is this an SCVI model?")
    return out


def scvi_tools_name(ours: str) -> str:
    """The scvi-tools name of a censusvi parameter (inverse of ``censusvi_name``)."""
    m = re.match(
        r"^(z_encoder|l_encoder|decoder)\.fc\.(linears|norms)\.(\d+)\.(?:linear\.)?(.+)$", ours
    )
    if m:
        owner, kind, layer, rest = m.groups()
        prefix = {
            "z_encoder": "z_encoder.encoder",
            "l_encoder": "l_encoder.encoder",
            "decoder": "decoder.px_decoder",
        }
        return f"{prefix[owner]}.fc_layers.Layer {layer}.{0 if kind == 'linears' else 1}.{rest}"
    for old, new in _RENAMES.items():
        if ours.startswith(new):
            return old + ours[len(new) :]
    return ours  # px_r, library_log_means, library_log_vars
