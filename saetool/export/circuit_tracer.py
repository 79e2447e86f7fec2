"""circuit-tracer transcoder sets from a sweep of transcoders over every layer (a multi-hook sweep, saetool.sweep.multihook,
or a --config run of one ensemble per layer, saetool.sweep.driver.run_ensembles).

circuit-tracer (safety-research/circuit-tracer, utils/hf_utils.py load_transcoders and
transcoder/single_layer_transcoder.py load_transcoder_set / load_transcoder) reads a folder holding

    config.yaml             model_kind: transcoder_set, model_name, feature_input_hook, feature_output_hook (the hook
                            names under blocks.{L}, e.g. mlp.hook_in and hook_mlp_out), and for TopK
                            activation: topk with k (without `activation`, JumpReLU when the files hold a threshold,
                            else ReLU)
    layer_{L}.safetensors   one per layer L = 0 .. n_layers - 1 (every layer from 0 must be present): W_enc
                            [d_sae, d_model] (the transpose of SAELens' W_enc: circuit-tracer encodes with
                            F.linear), W_dec [d_sae, d_model], b_enc [d_sae], b_dec [d_model], and
                            activation_function.threshold [d_sae] (JumpReLU), W_skip [d_model, d_model] (skip)

A sweep trains several members per layer; member j of every layer (the same hyperparameters, since every layer's
ensemble is built from the same flags) forms one set: OUTPUT_DIR/transcoder_sets/<member folder name>/.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from saetool.saved import WEIGHTS_FILE

SETS_DIR = "transcoder_sets"
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def circuit_tracer_tensors(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One saved transcoder's tensors (SAELens layout) -> circuit-tracer's layer file layout (see the module
    docstring). float32, contiguous."""
    out = {"W_enc": weights["W_enc"].T, "W_dec": weights["W_dec"], "b_enc": weights["b_enc"], "b_dec": weights["b_dec"]}
    if "threshold" in weights:
        out["activation_function.threshold"] = weights["threshold"]
    if "W_skip" in weights:
        out["W_skip"] = weights["W_skip"]
    return {k: v.float().contiguous() for k, v in out.items()}


def _layout(indexes: list[dict]) -> tuple[dict[int, int], str, str] | str:
    """({layer: ensemble position}, input hook suffix, output hook suffix) when the ensembles (their sweep.json
    indexes) are transcoders of the same blocks.{L}.<in> -> blocks.{L}.<out> at layers 0..n-1 with the same
    members; else the reason (a string)."""
    parsed = [(_BLOCK.match(ix["store"]["hook_name"]), _BLOCK.match(ix["store"].get("target_hook") or ""))
              for ix in indexes]
    if not all(a and b and a[1] == b[1] for a, b in parsed):
        return "every pair must be blocks.L.<input> -> blocks.L.<output> of one layer"
    suffixes = {(a[2], b[2]) for a, b in parsed}
    if len(suffixes) != 1:
        return f"the pairs use different hooks ({sorted(suffixes)})"
    layers = {int(a[1]): i for i, (a, _) in enumerate(parsed)}
    if sorted(layers) != list(range(len(indexes))):
        return f"circuit-tracer needs every layer from 0, the sweep has layers {sorted(layers)}"
    kinds = {(ix["config"]["architecture"], ix["config"]["skip_connection"],
              str([m[ix["sweep_param"]] for m in ix["members"]])) for ix in indexes}
    if len(kinds) != 1:
        return "the layers' ensembles differ in architecture or hyperparameters"
    (suffix_in, suffix_out), = suffixes
    return layers, suffix_in, suffix_out


def write_transcoder_sets(out: Path, ensembles: list[tuple[Path, dict]], log=print) -> list[str]:
    """Write one circuit-tracer transcoder set per member under out/transcoder_sets/ when the `ensembles` ((sweep
    folder, its sweep.json index) each) are transcoders of one input/output hook pair at every layer 0..n-1 (else
    log why not, when every ensemble is a transcoder). Returns the sets' paths relative to `out`."""
    indexes = [ix for _, ix in ensembles]
    if not indexes or not all(ix["store"].get("target_hook") for ix in indexes):
        return []
    layout = _layout(indexes)
    if isinstance(layout, str):
        log(f"no circuit-tracer transcoder set: {layout}")
        return []
    layers, suffix_in, suffix_out = layout
    written = []
    for j, member in enumerate(indexes[0]["members"]):
        folder = out / SETS_DIR / Path(member["path"]).name
        folder.mkdir(parents=True, exist_ok=True)
        config = {"model_kind": "transcoder_set", "model_name": indexes[0]["store"]["model"],
                  "feature_input_hook": suffix_in, "feature_output_hook": suffix_out}
        if indexes[0]["config"]["architecture"] == "topk":
            config.update(activation="topk", k=int(member["k"]))
        for layer, i in sorted(layers.items()):
            folder_i, index_i = ensembles[i]
            path = folder_i / index_i["members"][j]["path"] / WEIGHTS_FILE
            save_file(circuit_tracer_tensors(load_file(str(path))), str(folder / f"layer_{layer}.safetensors"))
        (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        written.append(str(folder.relative_to(out)))
    log(f"circuit-tracer transcoder sets ({len(layers)} layers, {suffix_in} -> {suffix_out}): "
        f"{len(written)} in {out / SETS_DIR}")
    return written
