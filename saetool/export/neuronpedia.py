"""``saetool export neuronpedia OUTPUT_DIR``: Neuronpedia's bulk-import layout for every member, and SAELens'
``sparsity.safetensors`` beside each member.

Per member (one Neuronpedia *source*, id ``<layer>-<source set>``, source set ``<--source_set>-<member folder>``
in lower case with dashes) the export holds, under ``<export_dir>/<model id>/<source id>/``, the files of
Neuronpedia's exporter (neuronpedia utils ``convert-saedashboard-to-neuronpedia-export.py`` and its ``db_models``):

* ``release.jsonl``, ``model.jsonl``, ``sourceset.jsonl``, ``source.jsonl``: one JSON object each, with the fields
  of Neuronpedia's ``SourceRelease``, ``Model``, ``SourceSet`` and ``Source`` records;
* ``features/batch-<b>.jsonl.gz``: one ``Feature`` per line for latents ``[128 b, 128 (b + 1))`` (Neuronpedia's
  upload batches hold at most 128): ``index``, ``frac_nonzero`` (density), ``maxActApprox``, ``pos_str``/
  ``pos_values`` and ``neg_str``/``neg_values`` (the top and bottom logit effects ``W_dec[i] @ W_U``, at most 20),
  ``freq_hist_data_bar_heights``/``_values`` (the activation histogram: counts and bin centres in activation
  units, log-spaced bins of :data:`saetool.report.browser.collect.HIST_EDGES`), the other fields empty;
* ``activations/batch-<b>.jsonl.gz``: one ``Activation`` per context: ``tokens`` (strings) and ``values`` (the
  latent's activation per token), ``maxValue``, ``maxValueTokenIndex``, ``minValue``, ``binMin``/``binMax``/
  ``binContains`` (top activations: -1, as SAEDashboard's top group; quantile samples: the band's activation range
  and the fraction of the sample in it).

``sparsity.safetensors`` (SAELens' file name and key): ``{"sparsity": float32 [d_sae]}`` = ``log10(density +
1e-10)`` over the evaluated rows (SAELens' ``log_feature_sparsity``), written into each member's folder.

The data come from the browser's collection pass (:mod:`saetool.report.browser.collect`) on the held-out rows, or the first
``--browser_rows`` rows. Token strings need the store's model (or ``--model``): without it the export is refused.
"""

from __future__ import annotations

import gzip
import json
import re
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from saetool.config import NeuronpediaConfig
from saetool.evaluate import encode_pass
from saetool.lm import load_model
from saetool.report import (
    HIST_EDGES,
    browser_blocker,
    collect_results,
    latent_record,
    make_collector,
    member_logits,
    token_strings,
)
from saetool.saved import finish_export, load_sae, single_hook_index, start_export
from saetool.store import ActivationStore

__all__ = ["FEATURES_PER_BATCH", "NeuronpediaConfig", "export_neuronpedia", "log_sparsity"]

FEATURES_PER_BATCH = 128
SPARSITY_FILE = "sparsity.safetensors"




def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")


def log_sparsity(fired: np.ndarray, n_tokens: int) -> torch.Tensor:
    """SAELens' ``log_feature_sparsity``: float32 ``log10(fired / n_tokens + 1e-10)`` ``[d_sae]``."""
    return torch.log10(torch.as_tensor(fired, dtype=torch.float64) / max(int(n_tokens), 1) + 1e-10).float()


def _records_meta(cfg, model_id: str, source_id: str, set_name: str, store, hook: str, now: str) -> dict:
    who = {"creatorId": cfg.creator_id, "createdAt": now}
    release = {"name": set_name, "description": f"saetool sweep {cfg.output_dir}", "creatorName": cfg.creator_name,
               "visibility": "PUBLIC", "isNewUi": False, "featured": False, "descriptionShort": f"saetool {set_name}",
               "urls": [], "creatorEmail": None, "creatorNameShort": cfg.creator_name, "defaultSourceSetName": None,
               "defaultSourceId": None, "defaultUmapSourceIds": [], **who}
    model = {"id": model_id, "instruct": False, "displayNameShort": model_id, "displayName": store.spec.model,
             "tlensId": None, "dimension": None, "visibility": "PUBLIC", "defaultSourceSetName": None,
             "defaultSourceId": None, "inferenceEnabled": False, "layers": 0, "neuronsPerLayer": 0, "owner": "",
             "updatedAt": now, "website": None, **who}
    sourceset = {"modelId": model_id, "name": set_name, "hasDashboards": True, "visibility": "PUBLIC",
                 "description": f"{hook} SAE ({set_name})", "type": "", "creatorName": cfg.creator_name, "urls": [],
                 "creatorEmail": None, "releaseName": set_name, "defaultOfModelId": None, "defaultRange": 1,
                 "defaultShowBreaks": True, "showDfa": False, "showCorrelated": False, "showHeadAttribution": False,
                 "showUmap": False, **who}
    source = {"id": source_id, "modelId": model_id, "setName": set_name, "hasDashboards": True,
              "inferenceEnabled": False, "inferenceHosts": [], "saelensConfig": None, "saelensRelease": None,
              "saelensSaeId": None, "hfRepoId": None, "hfFolderId": None, "visibility": "PUBLIC",
              "defaultOfModelId": None, "hasUmap": False, "hasUmapLogSparsity": False, "hasUmapClusters": False,
              "num_prompts": store.spec.n_contexts, "num_tokens_in_prompt": store.spec.context_size,
              "dataset": store.spec.dataset, "notes": "exported by saetool", **who}
    return {"release": release, "model": model, "sourceset": sourceset, "source": source}


def _hist_bars(rec: dict) -> tuple[list[float], list[float]]:
    """The latent's activation histogram as Neuronpedia bars: (heights, bin centres in activation units)."""
    e = HIST_EDGES
    step = float(e[1] - e[0])
    centres = np.concatenate([[e[0] - step / 2], (e[:-1] + e[1:]) / 2, [e[-1] + step / 2]])
    first, counts = rec["hist"]["first"], rec["hist"]["counts"]
    return [float(c) for c in counts], [float(f"{10 ** centres[first + j]:.4g}") for j in range(len(counts))]


def _activation(w: dict, vocab: dict, base: dict, uid: str, band: tuple) -> dict:
    values = [float(v) for v in w["acts"]]
    top = int(np.argmax(values))
    return {"id": uid, "tokens": [vocab[t] for t in w["ids"]], **base, "maxValue": values[top],
            "maxValueTokenIndex": top, "minValue": min(values), "values": values, "dataSource": None,
            "dataIndex": None, "dfaValues": [], "dfaTargetIndex": None, "dfaMaxValue": None, "lossValues": [],
            "logitContributions": None, "binMin": band[0], "binMax": band[1], "binContains": band[2],
            "qualifyingTokenIndex": w["at"]}


def _feature_lines(rec: dict, vocab: dict, model_id: str, source_id: str, who: dict) -> tuple[dict, list[dict]]:
    """One Neuronpedia Feature and its Activations for a latent record (saetool.report.browser.records)."""
    i = rec["index"]
    base = {"index": str(i), "layer": source_id, "modelId": model_id, **who}
    acts = [_activation(w, vocab, base, f"{source_id}-{i}-top{k}", (-1, -1, -1)) for k, w in enumerate(rec["top"])]
    n_samples = sum(len(q["windows"]) for q in rec["quantiles"]) or 1
    for g, q in enumerate(rec["quantiles"]):
        band = (q["low"], q["high"], len(q["windows"]) / n_samples)
        acts += [_activation(w, vocab, base, f"{source_id}-{i}-q{g}-{k}", band) for k, w in enumerate(q["windows"])]
    heights, values = _hist_bars(rec)
    lg = rec["logits"] or {"pos": [], "neg": []}
    feature = {"modelId": model_id, "layer": source_id, "index": str(i), **who, "maxActApprox": rec["max"],
               "hasVector": False, "vector": [], "vectorLabel": None, "vectorDefaultSteerStrength": 10,
               "hookName": None, "topkCosSimIndices": [], "topkCosSimValues": [], "neuron_alignment_indices": [],
               "neuron_alignment_values": [], "neuron_alignment_l1": [], "correlated_neurons_indices": [],
               "correlated_neurons_pearson": [], "correlated_neurons_l1": [], "correlated_features_indices": [],
               "correlated_features_pearson": [], "correlated_features_l1": [],
               "neg_str": [vocab[t] for t, _ in lg["neg"]], "neg_values": [v for _, v in lg["neg"]],
               "pos_str": [vocab[t] for t, _ in lg["pos"]], "pos_values": [v for _, v in lg["pos"]],
               "frac_nonzero": rec["density"], "freq_hist_data_bar_heights": heights,
               "freq_hist_data_bar_values": values, "logits_hist_data_bar_heights": [],
               "logits_hist_data_bar_values": [], "decoder_weights_dist": []}
    return feature, acts


def _write_jsonl_gz(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r, allow_nan=False) + "\n" for r in rows).encode("utf-8")
    path.write_bytes(gzip.compress(data, compresslevel=5))


def _collect(cfg: NeuronpediaConfig, saes, store, hook: str, eval_tokens: int) -> tuple[list[dict], tuple]:

    why = browser_blocker(store)
    if why is not None:
        raise ValueError(f"cannot export to Neuronpedia: {why}")
    n = store.spec.n_rows
    if cfg.browser_rows is not None:
        rows = (0, min(int(cfg.browser_rows), n))
    elif eval_tokens > 0:
        rows = (n - eval_tokens, n)
    else:
        raise ValueError("cannot export to Neuronpedia: the sweep held out no rows (eval_tokens 0); pass "
                         "--browser_rows N to take the contexts from the first N rows")
    collector = make_collector(cfg, saes, store, cfg.device)
    encode_pass(saes, store, hook, rows, cfg.device, collector=collector)
    return collect_results(collector, store, len(saes)), rows


def export_neuronpedia(cfg: NeuronpediaConfig, model=None, log=print) -> Path:
    """Write the Neuronpedia layout of every member and each member's ``sparsity.safetensors`` (module docstring).

    Args:
        cfg: the settings; model: an already loaded ``TransformerBridge`` (default: load ``cfg.model`` or the
            store's model); log: progress lines.

    Returns:
        The export folder. Raises ValueError (one line, before anything is written) for an unfinished sweep, a
        store without token ids (foreign ``--array``), no rows to take contexts from, or no loadable model.
    """

    out_dir = Path(cfg.output_dir)
    index = single_hook_index(out_dir, "saetool export neuronpedia")
    entries = index["members"]
    saes = [load_sae(out_dir / e["path"], device=cfg.device, dtype="float32") for e in entries]
    hook = saes[0].cfg.get("hook_name") or index.get("store", {}).get("hook_name")
    store_path = cfg.dataset_dir or index.get("store", {}).get("path")
    array = index.get("config", {}).get("array")
    store = ActivationStore.open(store_path, array=array) if store_path else None
    results, rows = _collect(cfg, saes, store, hook, int(index.get("config", {}).get("eval_tokens", 0) or 0))
    model = _token_model(cfg, store, model)
    model_id = cfg.model_id or _slug(Path(store.spec.model).name)
    layer = re.match(r"blocks\.(\d+)\.", hook or "")
    now = datetime.now(timezone.utc).isoformat()
    final = Path(cfg.export_dir) if cfg.export_dir else out_dir / "export" / "neuronpedia"
    tmp = start_export(final, out_dir, index)
    sparsity = []
    for entry, sae, res in zip(entries, saes, results):
        set_name = f"{cfg.source_set}-{_slug(Path(entry['path']).name)}"
        source_id = f"{layer.group(1) if layer else 0}-{set_name}"
        meta = _records_meta(cfg, model_id, source_id, set_name, store, hook, now)
        _write_source(tmp / model_id / source_id, cfg, sae, hook, model, res, meta, now)
        full = np.zeros(sae.d_sae, dtype=np.int64)
        full[:len(res["density"])] = res["fired"]
        sparsity.append((out_dir / entry["path"] / SPARSITY_FILE, log_sparsity(full, res["n_tokens"])))
    finish_export(tmp, final)
    for path, values in sparsity:
        save_file({"sparsity": values}, str(path))
    log(f"export: {len(saes)} Neuronpedia sources in {final} (rows {rows[0]}..{rows[1]}); {SPARSITY_FILE} beside "
        "each member")
    return final


def _token_model(cfg: NeuronpediaConfig, store, model):
    """`model`, or (None) the model of ``--model`` or the store, loaded for the token strings; ValueError (one line)
    when it cannot be loaded."""
    if model is None:
        name = cfg.model or store.spec.model
        try:
            model = load_model(name, device=cfg.device)
        except ValueError as e:
            raise ValueError(f"cannot export to Neuronpedia: the model {name!r} for the token strings cannot be "
                             f"loaded ({e}); pass --model") from None
    return model


def _write_source(folder: Path, cfg: NeuronpediaConfig, sae, hook: str, model, res: dict, meta: dict,
                  now: str) -> None:
    """Write one member's Neuronpedia source into `folder` (created): its four records (`meta`, from
    `_records_meta`) and its features and activations in batches of FEATURES_PER_BATCH latents; `res` is the
    member's collection result."""
    model_id, source_id = meta["model"]["id"], meta["source"]["id"]
    n = len(res["density"])
    logits, _ = member_logits(cfg, sae, hook, model, n)
    recs = [latent_record(res, i, res["before"], logits) for i in range(n)]
    ids = {t for r in recs for w in r["top"] + [w for q in r["quantiles"] for w in q["windows"]] for t in w["ids"]}
    ids |= {t for r in recs if r["logits"] for t, _ in r["logits"]["pos"] + r["logits"]["neg"]}
    vocab = token_strings(model.tokenizer, list(ids))
    folder.mkdir(parents=True)
    for name, record in meta.items():
        (folder / f"{name}.jsonl").write_text(json.dumps(record) + "\n")
    who = {"creatorId": cfg.creator_id, "createdAt": now}
    for b in range(0, n, FEATURES_PER_BATCH):
        lines = [_feature_lines(r, vocab, model_id, source_id, who) for r in recs[b:b + FEATURES_PER_BATCH]]
        _write_jsonl_gz(folder / "features" / f"batch-{b // FEATURES_PER_BATCH}.jsonl.gz", [f for f, _ in lines])
        _write_jsonl_gz(folder / "activations" / f"batch-{b // FEATURES_PER_BATCH}.jsonl.gz",
                        [a for _, acts in lines for a in acts])
